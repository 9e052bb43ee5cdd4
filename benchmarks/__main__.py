"""`python -m benchmarks ...`: the same command as `python -m mfcore bench ...`."""
import sys

from mfcore.cli import main

main(["bench", *sys.argv[1:]])

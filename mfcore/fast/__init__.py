"""Speed paths: the same maths as the paper's modules, computed with fewer passes or operators.

Each module here has a test that it equals its plain reference in values and gradients.
"""

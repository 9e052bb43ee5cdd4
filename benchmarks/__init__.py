"""Speed and memory benchmarks of mfcore against Hugging Face transformers' MaskFormer (outside the package)."""

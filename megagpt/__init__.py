"""megagpt: GPT pre-training on DeepSpeed, from Tiny Shakespeare to multi-node runs."""

__version__ = "0.1.0"

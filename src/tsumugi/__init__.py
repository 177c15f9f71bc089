"""tsumugi: training and inference for the Qwen-Image family and Z-Image."""

__version__ = "0.1.0"

"""moe-vlm: sparse Mixture-of-Experts (vision-)language models for research."""

__version__ = "0.1.0"

"""ckptconv: Hugging Face <-> Megatron-Core checkpoint conversion for vision-language models."""

__version__ = "0.1.0"

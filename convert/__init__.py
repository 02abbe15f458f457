"""Converters from Hugging Face checkpoints to MLX Gemma 3 folders (`python -m mlx_gemma3.convert`)."""

from .hf import convert_hf

__all__ = ["convert_hf"]

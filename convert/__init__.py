"""Converters from Hugging Face checkpoints to MLX Gemma 3 folders (`python -m mlx_gemma3.convert`).

Internal: not part of the public API, which docs/api.md lists."""

"""Converters from Hugging Face checkpoints to MLX Gemma 3 folders (`python -m mlx_gemma3.convert`).

Internal: a command line, whose flags are its interface; the Python API is listed in docs/api.md."""

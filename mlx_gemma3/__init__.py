"""mlx_gemma3: Google's Gemma 3 models on Apple Silicon through MLX."""

from .errors import Gemma3Error
from .load import load

__all__ = ["Gemma3Error", "load"]
__version__ = "0.1.0"

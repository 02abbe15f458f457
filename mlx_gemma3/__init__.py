"""mlx_gemma3: Google's Gemma 3 models on Apple Silicon through MLX."""

from .errors import Gemma3Error
from .generation.chat import Chat
from .generation.step import generate_step
from .generation.stream import GenerationResponse, generate, stream_generate
from .model.load import load
from .model.sources import demo_gguf, demo_model

__all__ = [
    "Chat", "Gemma3Error", "GenerationResponse", "demo_gguf", "demo_model", "generate", "generate_step", "load",
    "stream_generate",
]
__version__ = "0.1.0"

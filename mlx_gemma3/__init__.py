"""mlx_gemma3: Google's Gemma 3 models on Apple Silicon through MLX."""

import sys
import types

from .errors import Gemma3Error
from .generation.conversation import Chat
from .generation.encode import embed
from .generation.step import generate_step
from .generation.text_stream import GenerationResponse, generate, stream_generate
from .loader import load, load_embedding
from .model.sources import demo_gguf, demo_model

__all__ = [
    "Chat",
    "Gemma3Error",
    "GenerationResponse",
    "demo_gguf",
    "demo_model",
    "embed",
    "generate",
    "generate_step",
    "load",
    "load_embedding",
    "stream_generate",
]
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """This package, whose `generate` stays the function when the command line's module `mlx_gemma3.generate`
    is imported (Python binds a submodule's name onto its package; `python -m mlx_gemma3.generate` runs it)."""

    def __setattr__(self, name, value):
        if name in __all__ and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

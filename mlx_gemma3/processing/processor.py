"""The processor: what turns user input into model input for one model folder (tokenizer, config, chat template)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..model.config import ModelConfig
from .grammar import ll_tokenizer
from .prompt import find_chat_template
from .tokenizer import Tokenizer

__all__ = ["Processor"]


@dataclass
class Processor:
    """The tokenizer (None when the folder has none), the model's config and the folder's chat template."""

    tokenizer: Tokenizer | None
    config: ModelConfig
    chat_template: str | None = None

    @classmethod
    def from_folder(cls, folder: Path, config: ModelConfig) -> Processor:
        return cls(Tokenizer.from_folder(folder), config, find_chat_template(folder))

    @cached_property
    def grammar_tokenizer(self):
        """llguidance's view of the vocabulary, for constrained replies (built on first use: about a second)."""
        return ll_tokenizer(self.tokenizer)

"""The processor: what turns user input into model input for one model folder (tokenizer, config, chat template)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..errors import Gemma3Error
from ..model.config import ModelConfig
from .function_gemma import FUNCTION_GEMMA, RESPONSE_START
from .grammar import ll_tokenizer
from .prompt import find_chat_template
from .tokenizer import Tokenizer
from .tools import template_tool_style

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

    @cached_property
    def tool_style(self) -> str:
        """How this model calls tools (processing.tools.STYLES): from its chat template."""
        return template_tool_style(self.chat_template)

    @cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens besides <eos> and <end_of_turn> that end a reply: FunctionGemma's <start_function_response>,
        where the model stops to let the caller run its calls."""
        if self.tool_style != FUNCTION_GEMMA or self.tokenizer is None:
            return ()
        try:
            return (self.tokenizer.token_id(RESPONSE_START),)
        except Gemma3Error:
            return ()

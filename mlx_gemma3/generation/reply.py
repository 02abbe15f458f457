"""One reply's bookkeeping, shared by stream_generate and the server: its token budget, stop ids, detokenizer and
structured-output constraint, the text each token adds and why the reply ends.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from ..processing.tokenizer import EOS_IDS
from .constrain import DEAD_END
from .options import Options


def eos_ids(processor, extra: tuple[int, ...] = ()) -> set[int]:
    """Every id that ends a reply: <eos>, <end_of_turn>, the config's, the model's own (FunctionGemma's
    <start_function_response>) and the caller's."""
    return {*EOS_IDS, *processor.config.eos_token_ids, *getattr(processor, "stop_ids", ()), *extra}


class Reply:
    """A reply being generated: `processors` (the options' logits processors, its constraint last) go to the
    generator; `add(token)` gives the text the token adds and sets `finish` when the reply ends with it ("stop",
    "length", or "dead_end" when the constraint allowed nothing else; a constrained reply complete at max_tokens
    ends "stop"). `room`: tokens the context leaves."""

    def __init__(self, processor, options: Options, room: int):
        self.max_tokens = options.token_budget(room)
        self.stop = eos_ids(processor, options.stop_ids)
        self.detokenizer = processor.tokenizer.detokenizer() if processor.tokenizer else None
        self.processors, self.constraint = options.reply_processors(processor, self.max_tokens)
        self.tokens: list[int] = []
        self.finish: str | None = None

    def add(self, token: int) -> str:
        """The text `token` adds (held back while it may be part of a longer character); sets `finish`."""
        self.tokens.append(token)
        finish = "stop" if token in self.stop else "length" if len(self.tokens) == self.max_tokens else None
        if finish == "length" and self.constraint is not None and self.constraint.completes(len(self.tokens), token):
            finish = "stop"
        if finish == "stop" and self.constraint is not None and self.constraint.dead_end is not None:
            finish = DEAD_END
        text = "" if self.detokenizer is None or token in self.stop else self.detokenizer.add(token)
        if finish and self.detokenizer is not None:
            text += self.detokenizer.finish()
        self.finish = finish
        return text

    @property
    def finish_detail(self) -> str | None:
        """Why a constrained reply ended "length": no reply the grammar allows fitted max_tokens."""
        return self.constraint.unfit if self.finish == "length" and self.constraint is not None else None

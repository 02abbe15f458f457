"""Constrained decoding: a stateful logits processor that masks every token a grammar forbids at each step.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import llguidance
import mlx.core as mx
import numpy as np

from ..errors import Gemma3Error
from .prompt_file import common_prefix

DEAD_END = "dead_end"  # the finish reason of a reply the grammar could not continue


class Constraint:
    """A grammar the reply must follow, as a logits processor `(tokens so far [N], logits [1, V]) -> logits`.

    It learns what was generated from `tokens` alone: the length at its first call is where the reply starts;
    each later call brings the matcher to `tokens` (rolling back whatever a shorter or different sequence drops,
    as speculative decoding's rejected drafts, then consuming what is new), computes the allowed tokens on the
    CPU while the forward that produced `logits` runs, and returns the logits with every other token at -inf.
    A finished grammar allows only the end tokens, so the reply ends; a dead end (nothing allowed) allows only
    them too and sets `dead_end` to the reason. Make one per reply: it is the reply's state."""

    def __init__(self, processor, grammar: str):
        if processor.tokenizer is None:
            raise Gemma3Error("constrained decoding needs the model's tokenizer.model, and this folder has none")
        self.stop_ids = processor.grammar_tokenizer.eos_tokens
        self.matcher = llguidance.LLMatcher(processor.grammar_tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise Gemma3Error(f"the grammar cannot be used for constrained decoding: {self.matcher.get_error()}")
        self.vocab_size = processor.tokenizer.vocab_size
        self.start: int | None = None
        self.followed: list[int] = []  # the reply's tokens the matcher has consumed
        self.refused: int | None = None  # the first token after `followed` that the grammar refused
        self.dead_end: str | None = None  # why nothing but an end token is allowed, when that is so

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        mx.async_eval(logits)  # start the forward; the mask is computed while it runs
        if self.start is not None and tokens.shape[0] > self.start and tokens[-1].item() in self.stop_ids:
            return logits  # the reply has ended: this step is never handed out, and the state stays as it ended
        self.follow(tokens)
        allowed = self.allowed(logits.shape[-1])
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))

    def admissible(self, tokens: list[int], drafts: list[int]) -> int:
        """How many of `drafts`, after `tokens`, the grammar accepts: speculative decoding verifies only those."""
        self.follow(mx.array(tokens))
        return self.matcher.validate_tokens(drafts) if self.refused is None and drafts else 0

    def follow(self, tokens: mx.array) -> None:
        """Bring the matcher to the reply in `tokens`. A token the grammar refuses (a draft that verification will
        reject, since this mask gives it no probability) leaves the matcher before it and makes a dead end."""
        if self.start is None:
            self.start = tokens.shape[0]
        reply = tokens[self.start :].tolist() if tokens.shape[0] > self.start else []
        kept = common_prefix(self.followed, reply)
        if kept < len(self.followed):
            self.matcher.rollback(len(self.followed) - kept)
            del self.followed[kept:]
        new = reply[kept:]
        valid = self.matcher.validate_tokens(new) if new else 0
        if valid and not self.matcher.consume_tokens(new[:valid]):
            valid = 0
        self.followed += new[:valid]
        self.refused = new[valid] if valid < len(new) else None

    def allowed(self, width: int) -> np.ndarray:
        """A boolean mask [width] of the tokens allowed next (only the end tokens once finished or stuck)."""
        allowed = np.zeros(width, dtype=bool)
        if self.refused is None and not self.matcher.is_error():
            bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            mask = np.unpackbits(bits, bitorder="little")[: min(self.vocab_size, width)]
            allowed[: mask.shape[0]] = mask
            if allowed[self.stop_ids].any():
                allowed[self.stop_ids] = True  # either end token ends the reply (<eos> or <end_of_turn>)
        self.dead_end = None if allowed.any() else self.dead_end_reason()
        allowed[self.stop_ids] |= self.dead_end is not None
        return allowed

    def dead_end_reason(self) -> str:
        if self.refused is not None:
            return f"token {self.refused} does not continue the grammar"
        return self.matcher.get_error() or f"no token can continue the grammar ({self.matcher.stop_reason()})"

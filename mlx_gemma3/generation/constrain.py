"""Constrained decoding: a stateful logits processor that masks every token a grammar forbids at each step."""

from __future__ import annotations

import llguidance
import mlx.core as mx
import numpy as np

from ..errors import Gemma3Error
from ..processing.tokenizer import Tokenizer

DEAD_END = "dead_end"  # the finish reason of a reply the grammar could not continue


class Constraint:
    """A grammar the reply must follow, as a logits processor `(tokens so far [N], logits [1, V]) -> logits`.

    It learns what was generated from `tokens` alone: the length at its first call is where the reply starts;
    each later call brings the matcher to `tokens` (rolling back whatever a shorter or different sequence drops,
    as speculative decoding's rejected drafts, then consuming what is new), computes the allowed tokens on the
    CPU while the forward that produced `logits` runs, and returns the logits with every other token at -inf.
    A finished grammar allows only the end tokens, so the reply ends; a dead end (nothing allowed) allows only
    them too and sets `dead_end` to the reason. Make one per reply: it is the reply's state."""

    def __init__(self, tokenizer: Tokenizer, grammar: str):
        self.stop_ids = np.array(tokenizer.grammar_tokenizer.eos_tokens)
        self.matcher = llguidance.LLMatcher(tokenizer.grammar_tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise Gemma3Error(f"the grammar cannot be used for constrained decoding: {self.matcher.get_error()}")
        self.vocab_size = tokenizer.vocab_size
        self.start: int | None = None
        self.followed: list[int] = []  # the reply's tokens the matcher has consumed
        self.dead_end: str | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        mx.async_eval(logits)  # start the forward; the mask is computed while it runs
        if not self.follow(tokens):
            return logits  # a draft the grammar refuses came before: verification rejects it, this row goes unused
        allowed = self.allowed(logits.shape[-1])
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))

    def follow(self, tokens: mx.array) -> bool:
        """Bring the matcher to the reply in `tokens`; False when it holds a token the grammar refuses."""
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
            self.dead_end = self.matcher.get_error()
        self.followed += new[:valid]
        return valid == len(new)

    def allowed(self, width: int) -> np.ndarray:
        """A boolean mask [width] of the tokens allowed next (only the end tokens once finished or stuck)."""
        allowed = np.zeros(width, dtype=bool)
        if self.dead_end is None and not self.matcher.is_error():
            bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            mask = np.unpackbits(bits, bitorder="little")[: min(self.vocab_size, width)]
            allowed[: mask.shape[0]] = mask
            if allowed[self.stop_ids].any():
                allowed[self.stop_ids] = True  # either end token ends the reply (<eos> or <end_of_turn>)
            if allowed.any():
                return allowed
            self.dead_end = self.matcher.get_error() or f"no token can continue the grammar ({self.matcher.stop_reason()})"
        self.dead_end = self.dead_end or self.matcher.get_error()
        allowed[self.stop_ids] = True
        return allowed


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

"""Constrained decoding: a stateful logits processor that masks every token a grammar forbids at each step, keeps
JSON within what a parser keeps, and closes the reply within its token budget.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import llguidance
import mlx.core as mx
import numpy as np

from ..errors import Gemma3Error
from ..processing.grammar import limits_grammar
from .closing import Closer
from .prefix_reuse import common_prefix

DEAD_END = "dead_end"  # the finish reason of a reply the grammar could not continue
CLOSING_MARGIN = 16  # tokens: the budget is watched once no more than the shortest finish plus these are left
CANDIDATES = 8  # the model's likeliest allowed tokens weighed, once the budget is watched, for keeping a finish


class Constraint:
    """A grammar the reply must follow, as a logits processor `(tokens so far [N], logits [1, V]) -> logits`.

    It learns what was generated from `tokens` alone: the length at its first call is where the reply starts;
    each later call brings the matcher to `tokens` (rolling back whatever a shorter or different sequence drops,
    as speculative decoding's rejected drafts, then consuming what is new), computes the allowed tokens on the
    CPU while the forward that produced `logits` runs, and returns the logits with every other token at -inf.
    A finished grammar allows only the end tokens, so the reply ends; a dead end (nothing allowed) allows only
    them too and sets `dead_end` to the reason. Make one per reply: it is the reply's state.

    `json_limits` (default): the JSON parts of the grammar also keep to processing.grammar's JSON limits (numbers a
    parser keeps, bounded whitespace). `max_tokens`: the reply's token budget. The constraint then knows a short
    finish of the grammar from where the reply is (closing.Closer); once no more than that finish plus
    CLOSING_MARGIN tokens are left it allows only tokens that keep a finish within the budget (among the model's
    CANDIDATES likeliest allowed tokens and the finish's next one), so the reply is complete when the budget ends.
    When even the shortest finish found does not fit the budget at the start, `unfit` says so and the reply runs
    unclosed (it ends with finish reason "length")."""

    def __init__(self, processor, grammar: str, max_tokens: int | None = None, json_limits: bool = True):
        if processor.tokenizer is None:
            raise Gemma3Error("constrained decoding needs the model's tokenizer.model, and this folder has none")
        ll_tokenizer = processor.grammar_tokenizer
        self.stop_ids = ll_tokenizer.eos_tokens
        self.matcher = matcher(ll_tokenizer, grammar)
        limits = limits_grammar(grammar) if json_limits else None
        self.matchers = [self.matcher, *([matcher(ll_tokenizer, limits)] if limits else [])]
        self.vocab_size = processor.tokenizer.vocab_size
        self.max_tokens = max_tokens
        self.closer = Closer(grammar, ll_tokenizer, self.matchers) if max_tokens is not None else None
        self.unfit: str | None = None  # why no reply the grammar allows fits in max_tokens, when that is so
        self.watched = False  # whether the budget has been watched (tokens held to a finish within it)
        self.last_finish: tuple[int, int] | None = None  # (reply length, finish length) when last searched
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
        if self.closer is not None and self.dead_end is None:
            allowed = self.within_budget(allowed, logits)
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))

    def admissible(self, tokens: list[int], drafts: list[int]) -> int:
        """How many of `drafts`, after `tokens`, the grammar accepts: speculative decoding verifies only those."""
        self.follow(mx.array(tokens))
        return self.valid_prefix(drafts) if self.refused is None and drafts else 0

    def valid_prefix(self, tokens: list[int]) -> int:
        return min(m.validate_tokens(tokens) for m in self.matchers)

    def follow(self, tokens: mx.array) -> None:
        """Bring the matchers to the reply in `tokens`. A token the grammar refuses (a draft that verification will
        reject, since this mask gives it no probability) leaves the matchers before it and makes a dead end."""
        if self.start is None:
            self.start = tokens.shape[0]
        reply = tokens[self.start :].tolist() if tokens.shape[0] > self.start else []
        kept = common_prefix(self.followed, reply)
        if kept < len(self.followed):
            for m in self.matchers:
                m.rollback(len(self.followed) - kept)
            if self.closer is not None:
                self.closer.rollback(len(self.followed) - kept)
            del self.followed[kept:]
        new = reply[kept:]
        valid = self.valid_prefix(new) if new else 0
        if valid and not all([m.consume_tokens(new[:valid]) for m in self.matchers]):
            valid = 0  # not reached: a validated token is consumed
        if valid and self.closer is not None:
            self.closer.follow(new[:valid])
        self.followed += new[:valid]
        self.refused = new[valid] if valid < len(new) else None

    def allowed(self, width: int) -> np.ndarray:
        """A boolean mask [width] of the tokens allowed next (only the end tokens once finished or stuck)."""
        allowed = np.zeros(width, dtype=bool)
        if self.refused is None and not any(m.is_error() for m in self.matchers):
            allowed[: min(self.vocab_size, width)] = True
            for m in self.matchers:
                bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
                allowed[: min(self.vocab_size, width)] &= bits[: min(self.vocab_size, width)].astype(bool)
            if allowed[self.stop_ids].any():
                allowed[self.stop_ids] = True  # either end token ends the reply (<eos> or <end_of_turn>)
        self.dead_end = None if allowed.any() else self.dead_end_reason()
        allowed[self.stop_ids] |= self.dead_end is not None
        return allowed

    def dead_end_reason(self) -> str:
        if self.refused is not None:
            return f"token {self.refused} does not continue the grammar"
        errors = [m.get_error() for m in self.matchers if m.is_error()]
        if errors:
            return errors[0]
        return f"no token can continue the grammar ({self.matcher.stop_reason()})"

    def within_budget(self, allowed: np.ndarray, logits: mx.array) -> np.ndarray:
        """`allowed` held to the budget: unchanged while more than the shortest finish plus CLOSING_MARGIN tokens
        are left; then only the tokens after which a finish still fits (see the class). The finish is searched
        again only once the tokens made since the last search could have grown it (by CLOSING_MARGIN a token, at
        most, as the margin assumes) to where the budget is watched."""
        made, left = len(self.followed), self.max_tokens - len(self.followed)  # left: this token included
        if self.last_finish is not None and not self.watched:
            searched_at, length = self.last_finish
            if made >= searched_at and left - length - CLOSING_MARGIN > CLOSING_MARGIN * (made - searched_at):
                return allowed
        finish = self.closer.finish()
        self.last_finish = None if finish is None else (made, len(finish))
        if not made and self.unfit is None and finish is not None and len(finish) > left:
            self.unfit = unfit_reason(self.max_tokens, finish)
        if self.unfit is not None or finish is None or left > len(finish) + CLOSING_MARGIN:
            return allowed
        self.watched = True
        kept = np.zeros_like(allowed)
        if finish:
            kept[finish[0]] = True
        else:
            kept[self.stop_ids] = True  # complete: ending now fits
        scores = np.array(logits.reshape(-1).astype(mx.float32))  # waits for the forward
        scores[~allowed] = -np.inf
        for token in np.argpartition(-scores, CANDIDATES)[:CANDIDATES]:
            if not allowed[token] or kept[token]:
                continue
            after = [] if token in self.stop_ids else self.closer.finish(int(token))
            kept[token] = after is not None and (token in self.stop_ids or 1 + len(after) <= left)
        return kept

    def completes(self, count: int, token: int) -> bool:
        """Whether the reply of `count` tokens that ends with `token` (its last) is complete under the grammar."""
        if len(self.followed) < count - 1 or token in self.stop_ids:
            return False
        for m in self.matchers:
            copy = m.deep_copy()
            copy.rollback(len(self.followed) - (count - 1))
            if copy.validate_tokens([token]) != 1 or not copy.consume_token(token) or not copy.is_accepting():
                return False
        return True


def matcher(ll_tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    made = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
    if made.is_error():
        raise Gemma3Error(f"the grammar cannot be used for constrained decoding: {made.get_error()}")
    return made


def unfit_reason(max_tokens: int, finish: list[int]) -> str:
    return (
        f"no valid reply fits in max_tokens={max_tokens}: the shortest found is {len(finish)} tokens; raise max_tokens"
    )


def budget_problem(processor, grammar: str, max_tokens: int, json_limits: bool = True) -> str | None:
    """Why no reply the grammar allows fits in `max_tokens` tokens, or None when one does (or none is known)."""
    closer = Constraint(processor, grammar, max_tokens, json_limits).closer
    finish = closer.finish()
    return None if finish is None or len(finish) <= max_tokens else unfit_reason(max_tokens, finish)

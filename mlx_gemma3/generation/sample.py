"""Token choice: temperature, top-k, top-p, min-p (transformers' order and rules), repetition penalty, logit bias."""

from __future__ import annotations

import random

import mlx.core as mx

__all__ = ["Sampler"]

# The temperatures accepted everywhere (the library, the command lines, the server): OpenAI's range. 0 is greedy;
# past 2 sampling is close to uniform over the vocabulary and no longer useful.
TEMP_RANGE = (0.0, 2.0)


class Sampler:
    """Picks the next token from log-probabilities (or logits) [B, V]; greedy at temp 0; owns its PRNG key, so a
    seed reproduces a run."""

    def __init__(
        self, temp: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None
    ):
        problem = sampling_problem(temp, top_k, top_p, min_p)
        if problem:
            raise ValueError(problem)
        self.temp, self.top_k, self.top_p, self.min_p = temp, top_k, top_p, min_p
        self.key = mx.random.key(random.getrandbits(32) if seed is None else seed)

    def filter(self, logits: mx.array) -> mx.array:
        """Scaled logits with every excluded token at -inf."""
        logits = logits.astype(mx.float32) / self.temp
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = mx.sort(logits, axis=-1)[..., -self.top_k, None]
            logits = mx.where(logits < kth, -mx.inf, logits)
        if self.top_p < 1.0:
            logits = _top_p(logits, self.top_p)
        if self.min_p > 0.0:
            probs = mx.softmax(logits, axis=-1)
            threshold = self.min_p * probs.max(axis=-1, keepdims=True)
            logits = mx.where(probs < threshold, -mx.inf, logits)
        return logits

    def __call__(self, logits: mx.array) -> mx.array:
        if self.temp == 0:
            return mx.argmax(logits, axis=-1)
        self.key, key = mx.random.split(self.key)
        return mx.random.categorical(self.filter(logits), key=key)


def sampling_problem(temp: float, top_k: int, top_p: float, min_p: float) -> str | None:
    """What is wrong with the first bad sampling setting (naming it and its allowed range), or None."""
    if not TEMP_RANGE[0] <= temp <= TEMP_RANGE[1]:
        return f"temp must be in {temp_range_text()} (0 is greedy), got {temp}"
    if top_k < 0:
        return f"top_k must be 0 (off) or a positive number of tokens, got {top_k}"
    if not 0 < top_p <= 1:
        return f"top_p must be in (0, 1] (1 is off), got {top_p}"
    if not 0 <= min_p <= 1:
        return f"min_p must be in [0, 1] (0 is off), got {min_p}"
    return None


def temp_range_text() -> str:
    """TEMP_RANGE as messages write it: [0, 2]."""
    return f"[{TEMP_RANGE[0]:g}, {TEMP_RANGE[1]:g}]"


def _top_p(logits: mx.array, top_p: float) -> mx.array:
    """Drop the least likely tokens whose total probability is at most 1 − top_p (the best one always stays)."""
    order = mx.argsort(logits, axis=-1)
    sorted_probs = mx.take_along_axis(mx.softmax(logits, axis=-1), order, axis=-1)
    remove_sorted = mx.cumsum(sorted_probs, axis=-1) <= 1 - top_p
    remove_sorted[..., -1] = False
    remove = mx.put_along_axis(mx.zeros_like(remove_sorted), order, remove_sorted, axis=-1)
    return mx.where(remove, -mx.inf, logits)


def repetition_penalty(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """transformers' rule for the ids in `seen` [B, N]: positive logits divided by the penalty, negative multiplied."""
    picked = mx.take_along_axis(logits, seen, axis=-1)
    picked = mx.where(picked < 0, picked * penalty, picked / penalty)
    return mx.put_along_axis(logits, seen, picked, axis=-1)


def logit_bias(logits: mx.array, bias: dict[int, float]) -> mx.array:
    ids = mx.array(list(bias))
    return logits.at[..., ids].add(mx.array(list(bias.values()), dtype=logits.dtype))

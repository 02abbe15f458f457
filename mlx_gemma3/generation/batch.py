"""Continuous batching: sequences join after their own prefill, decode together one forward per step, and leave.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from ..model.cache import extract_cache, filter_cache, merge_caches
from .step import LogitsProcessor, Progress, Sampler, decode_one_token, prefill
from .thread_streams import generation_stream


@dataclass
class Row:
    """One sequence of a batch: its own sampler, processors and the token it will hand out next."""

    sampler: Sampler
    processors: tuple[LogitsProcessor, ...]
    seen: mx.array | None  # every token so far (history, prompt, reply), for the processors
    token: mx.array  # [1]: sampled, not yet handed out, fed at the next step
    logprobs: mx.array  # [1, V]: the log-probabilities that chose it
    steps: int = 0  # tokens handed out
    tokens: list[int] = field(default_factory=list)  # tokens handed out


class BatchGenerator:
    """Rows decoding together: `add` prefills a sequence on its own cache and lets it join, `step` runs one
    forward for every row and hands out each row's token, `remove` takes a row out with its cache. Each row's
    tokens and log-probabilities are those of its own run alone (up to float rounding of the batched matmuls).
    All calls must come from one thread (they run on its generation stream)."""

    def __init__(self, model):
        self.model = model
        self.rows: list[Row] = []
        self.cache: list | None = None  # a BatchCache per layer; row b of each is self.rows[b]

    def __len__(self) -> int:
        return len(self.rows)

    def add(
        self,
        ids: list[int],
        cache: list,
        *,
        sampler: Sampler,
        processors=(),
        history=(),
        image_features=None,
        prefill_step_size: int,
        progress: Progress | None = None,
    ) -> Row:
        """Prefill `ids` (after `history`, which `cache` already holds), sample the first token, join the batch."""
        with mx.stream(generation_stream()):
            prefill(self.model, ids[:-1], cache, prefill_step_size, image_features, progress)
            seen = mx.array([*history, *ids]) if processors else None
            token, logprobs = decode_one_token(self.model, mx.array(ids[-1:]), cache, sampler, tuple(processors), seen)
            self.cache = merge_caches([self.cache, cache] if self.cache else [cache])
        row = Row(sampler, tuple(processors), seen, token, logprobs)
        self.rows.append(row)
        return row

    def step(self) -> list[tuple[Row, int, mx.array]]:
        """(row, token, log-probabilities [V]) for every row; the next step is queued before they are handed out."""
        if not self.rows:
            return []
        with mx.stream(generation_stream()):
            handed = [(row, row.token, row.logprobs) for row in self.rows]
            logits = self.model(mx.concatenate([row.token for row in self.rows])[:, None], cache=self.cache)[:, -1]
            for i, row in enumerate(self.rows):
                row.token, row.logprobs = self.sample(row, logits[i : i + 1])
            mx.async_eval([part for row in self.rows for part in (row.token, row.logprobs)])
            out = []
            for row, token, logprobs in handed:
                row.steps += 1
                row.tokens.append(token.item())
                out.append((row, row.tokens[-1], logprobs[0]))
        return out

    @staticmethod
    def sample(row: Row, logits: mx.array) -> tuple[mx.array, mx.array]:
        if row.processors:
            row.seen = mx.concatenate([row.seen, row.token])
            for processor in row.processors:
                logits = processor(row.seen, logits)
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return row.sampler(logprobs), logprobs

    def remove(self, row: Row) -> list:
        """Take `row` out of the batch; returns its cache (holding every token it handed out)."""
        with mx.stream(generation_stream()):
            index = self.rows.index(row)
            cache = extract_cache(self.cache, index)
            rest = [i for i in range(len(self.rows)) if i != index]
            self.cache = filter_cache(self.cache, rest) if rest else None
            mx.eval([layer.state for layer in cache])
        del self.rows[index]
        return cache

    def clear(self) -> None:
        self.rows, self.cache = [], None

"""Continuous batching: sequences decode together one forward per step, joining and leaving the batch in place.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from ..errors import Gemma3Error
from ..model.cache import BatchCache, KVCache
from .sample import LogitsProcessor, draw, processed_logprobs
from .step import Progress, decode_one_token, prefill
from .thread_streams import generation_stream


@dataclass(eq=False)
class Row:
    """One sequence of a batch: its own sampler, processors and the token it will hand out next."""

    sampler: Callable[[mx.array], mx.array]  # a Sampler (rows that share its settings draw together) or any callable
    processors: tuple[LogitsProcessor, ...]
    seen: mx.array | None  # every token so far (history, prompt, reply), for the processors
    token: mx.array  # [1]: sampled, not yet handed out, fed at the next step
    logprobs: mx.array  # [1, V]: the log-probabilities that chose it
    tokens: list[int] = field(default_factory=list)  # tokens handed out
    owner: object = None  # what the caller ties to the row (the scheduler: its sequence)

    @property
    def steps(self) -> int:
        """Tokens handed out."""
        return len(self.tokens)


def batchable(cache: list) -> bool:
    """Whether a sequence's cache can be a row of a batch (caches bounded by max_kv_size cannot)."""
    return all(isinstance(layer, KVCache) for layer in cache)


class BatchGenerator:
    """Rows decoding together: `start` samples a prefilled sequence's first token and `join` puts it in the batch,
    `step` runs one forward for every row and hands out each row's token, `remove` takes a row out with its cache.
    Each row's tokens and log-probabilities are those of its run alone (up to float rounding of the batched
    matmuls). A row joins by writing only its own keys into the batch cache and leaves by moving the last row
    into its place. A cache that cannot be batched (bounded by max_kv_size) decodes as the only row. All calls
    must come from one thread (they run on its generation stream)."""

    def __init__(self, model):
        self.model = model
        self.rows: list[Row] = []
        self.cache: list | None = None  # a BatchCache per layer (row b of each is self.rows[b]), or one row's cache

    def __len__(self) -> int:
        return len(self.rows)

    def add(
        self,
        ids: list[int],
        cache: list,
        *,
        sampler,
        processors=(),
        history=(),
        image_features=None,
        prefill_step_size: int,
        progress: Progress | None = None,
    ) -> Row:
        """Prefill `ids` (after `history`, which `cache` already holds), sample the first token, join the batch."""
        with mx.stream(generation_stream()):
            prefill(self.model, ids[:-1], cache, prefill_step_size, image_features, progress)
        row = self.start(ids[-1], cache, sampler, processors, [*history, *ids])
        self.join(row, cache)
        return row

    def start(self, last: int, cache: list, sampler, processors=(), tokens=(), owner=None) -> Row:
        """The row of a sequence whose cache holds all of its prompt but the `last` token: its first token is
        sampled (queued) from the last token's forward on its own cache. `tokens`: the whole prompt."""
        with mx.stream(generation_stream()):
            processors = tuple(processors)
            seen = mx.array(list(tokens)) if processors else None
            token, logprobs = decode_one_token(self.model, mx.array([last]), cache, sampler, processors, seen)
        return Row(sampler, processors, seen, token, logprobs, owner=owner)

    def join(self, row: Row, cache: list) -> None:
        """Add a started row with its cache; the batch takes a copy of its keys (`cache` stays as it is), except a
        cache that cannot be batched, which the batch uses as is."""
        with mx.stream(generation_stream()):
            if not batchable(cache):
                if self.rows:
                    raise Gemma3Error(
                        "a cache bounded by max_kv_size decodes alone: give it a BatchGenerator of its own"
                    )
                self.cache = cache
            elif self.cache is None:
                self.cache = [BatchCache.merge([layer]) for layer in cache]
            else:
                self.cache = [
                    batch if batch.join(layer) else BatchCache.merge([batch, layer])
                    for batch, layer in zip(self.cache, cache)
                ]
        self.rows.append(row)

    def step(self) -> list[tuple[Row, int, mx.array]]:
        """(row, token, log-probabilities [V]) for every row; the next step is queued before they are handed out."""
        if not self.rows:
            return []
        with mx.stream(generation_stream()):
            handed = [(row, row.logprobs) for row in self.rows]
            fed = mx.concatenate([row.token for row in self.rows])
            logits = self.model(fed[:, None], cache=self.cache)[:, -1]
            for row in self.rows:
                if row.processors:
                    row.seen = mx.concatenate([row.seen, row.token])
            logprobs = processed_logprobs(
                logits, [row.processors for row in self.rows], [row.seen for row in self.rows]
            )
            tokens = draw([row.sampler for row in self.rows], logprobs)
            mx.async_eval(tokens, logprobs)
            for i, row in enumerate(self.rows):
                row.token, row.logprobs = tokens[i : i + 1], logprobs[i : i + 1]
            out = []
            for (row, row_logprobs), token in zip(handed, fed.tolist()):
                row.tokens.append(token)
                out.append((row, token, row_logprobs[0]))
        return out

    def remove(self, row: Row) -> list:
        """Take `row` out of the batch; returns its cache (holding every token it handed out)."""
        index = self.rows.index(row)
        with mx.stream(generation_stream()):
            if not isinstance(self.cache[0], BatchCache):
                cache, self.cache = self.cache, None
            else:
                cache = [layer.extract(index) for layer in self.cache]
                mx.eval([layer.state for layer in cache])
                for layer in self.cache:
                    layer.leave(index)
                if len(self.rows) == 1:
                    self.cache = None
        self.rows[index] = self.rows[-1]
        self.rows.pop()
        return cache

    def clear(self) -> None:
        self.rows, self.cache = [], None

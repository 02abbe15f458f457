"""The scheduler: every sequence in one loop. Each iteration runs one decode step for every decoding sequence (one
forward per batch of rows, one round per speculative sequence) and then one prefill chunk of a waiting prompt
(at most a budget of tokens), so a long prompt is read a chunk per iteration while the others keep receiving
tokens.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from ..errors import Gemma3Error
from .batch import BatchGenerator, Row, batchable
from .sample import LogitsProcessor, Sampler
from .speculative import Speculation
from .step import PREFILL_STEP_SIZE, Progress, PromptFeed
from .thread_streams import generation_stream


@dataclass(eq=False)
class Sequence:
    """One request to the scheduler: `ids` to feed after `history` (which `cache` already holds), with the features
    of the images among `ids`. `draft_tokens` > 0: speculative decoding (a `draft_model`, or prompt lookup when it
    is None) for at most `max_tokens` tokens. `chunk`: the most prompt tokens one forward feeds. With
    `keep_prompt_cache`, `prompt_cache` is set, when its prompt is in, to a cache that holds it and that nothing
    writes to afterwards."""

    ids: list[int]
    cache: list
    sampler: Sampler
    processors: tuple[LogitsProcessor, ...] = ()
    history: list[int] = field(default_factory=list)
    features: mx.array | None = None
    draft_tokens: int = 0
    draft_model: object = None
    draft_cache: list | None = None
    max_tokens: int | None = None
    chunk: int = PREFILL_STEP_SIZE
    progress: Progress | None = None
    keep_prompt_cache: bool = False
    prompt_cache: list | None = None
    feeds: list[PromptFeed] = field(default_factory=list)  # its prompt's prefill, then its draft model's
    row: Row | None = None  # decoding in a batch
    lane: BatchGenerator | None = None
    speculation: Speculation | None = None  # decoding by speculative rounds

    @property
    def tokens(self) -> list[int]:
        return [*self.history, *self.ids]


@dataclass
class Generated:
    """A token handed out: whose, its log-probabilities [V], whether a draft proposed it."""

    sequence: Sequence
    token: int
    logprobs: mx.array
    from_draft: bool = False


@dataclass
class Outcome:
    """What one iteration handed out (in order per sequence) and the sequences that failed (each with its error;
    they have left the scheduler)."""

    generated: list[Generated] = field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)


class Scheduler:
    """Sequences from prefill to their last token. `add` queues one; `iterate` runs one iteration; `remove` takes
    one out (prefilling or decoding) and returns its cache. Batchable sequences of one cache layout share a batch;
    a sequence whose cache cannot be batched (max_kv_size) decodes alone, one step per iteration; a speculative
    one runs one draft-and-verify round per iteration. Waiting prompts are prefilled in arrival order, one chunk of
    at most `prefill_step_size` tokens per iteration. Nothing else happens between iterations, so whatever a
    caller runs between them waits at most one iteration. Every call must come from one thread."""

    def __init__(self, model, prefill_step_size: int = PREFILL_STEP_SIZE):
        if prefill_step_size < 1:
            raise Gemma3Error(f"prefill_step_size must be at least 1, got {prefill_step_size}")
        self.model, self.prefill_step_size = model, prefill_step_size
        self.waiting: list[Sequence] = []  # being prefilled, in arrival order
        self.lanes: dict[object, BatchGenerator] = {}  # by cache layout (or by sequence, for one that decodes alone)
        self.speculating: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + self.decoding

    @property
    def decoding(self) -> int:
        return sum(len(lane) for lane in self.lanes.values()) + len(self.speculating)

    def add(self, sequence: Sequence) -> None:
        if not sequence.ids:
            raise Gemma3Error("a sequence needs at least one token to feed")
        if sequence.draft_tokens:
            if sequence.cache[0].offset != len(sequence.history):
                raise Gemma3Error("speculative decoding needs every token the cache holds")
            sequence.speculation = Speculation(
                self.model,
                sequence.draft_model,
                sequence.tokens,
                sequence.cache,
                sequence.draft_cache,
                sequence.draft_tokens,
                sequence.sampler,
                sequence.processors,
                sequence.max_tokens,
            )
        with mx.stream(generation_stream()):
            sequence.feeds = [
                PromptFeed(self.model, sequence.ids[:-1], sequence.cache, sequence.features, sequence.progress)
            ]
            if sequence.speculation is not None and (draft := sequence.speculation.drafter.catch_up(sequence.tokens)):
                sequence.feeds.append(draft)
        self.waiting.append(sequence)

    def iterate(self) -> Outcome:
        """One decode step for every decoding sequence, then one prefill chunk of a waiting prompt."""
        done = Outcome()
        with mx.stream(generation_stream()):
            for key, lane in list(self.lanes.items()):
                try:
                    done.generated += [Generated(row.owner, token, logprobs) for row, token, logprobs in lane.step()]
                except Exception as e:  # noqa: BLE001 — every row of the batch failed with it
                    del self.lanes[key]
                    done.failed += [(row.owner, e) for row in lane.rows]
            for sequence in list(self.speculating):
                try:
                    done.generated += [Generated(sequence, *made) for made in sequence.speculation.round()]
                except Exception as e:  # noqa: BLE001
                    self.speculating.remove(sequence)
                    done.failed.append((sequence, e))
            self.prefill(done)
        return done

    def prefill(self, done: Outcome) -> None:
        """One chunk (at most `prefill_step_size` tokens) of the first waiting prompt; the prompts that are in start
        decoding (their first token is handed out at the next iteration, not after other prompts' chunks)."""
        fed = False
        while self.waiting:
            sequence = self.waiting[0]
            try:
                feed = next((feed for feed in sequence.feeds if feed.remaining), None)
                if feed is not None:
                    if fed:
                        return
                    feed.feed(min(self.prefill_step_size, sequence.chunk))
                    fed = True
                if any(feed.remaining for feed in sequence.feeds):
                    return
                self.waiting.pop(0)
                self.start(sequence)
            except Exception as e:  # noqa: BLE001
                if sequence in self.waiting:
                    self.waiting.remove(sequence)
                done.failed.append((sequence, e))

    def start(self, sequence: Sequence) -> None:
        """A sequence whose prompt is in starts decoding: speculative ones by rounds, the others as a batch row (the
        batch of their cache layout, or one of their own)."""
        sequence.feeds = []
        if sequence.speculation is not None:
            if sequence.keep_prompt_cache:
                sequence.prompt_cache = copied(sequence.cache)
            self.speculating.append(sequence)
            return
        lane_key = self.lane_key(sequence.cache)
        lane = self.lanes.get(lane_key) or BatchGenerator(self.model)
        row = lane.start(
            sequence.ids[-1], sequence.cache, sequence.sampler, sequence.processors, sequence.tokens, sequence
        )
        lane.join(row, sequence.cache)
        self.lanes[lane_key] = lane
        sequence.row, sequence.lane = row, lane
        if batchable(sequence.cache):
            sequence.prompt_cache = sequence.cache if sequence.keep_prompt_cache else None  # the batch took a copy
            sequence.cache = None
        elif sequence.keep_prompt_cache:  # a cache decoding alone goes on changing
            sequence.prompt_cache = copied(sequence.cache)

    @staticmethod
    def lane_key(cache: list) -> object:
        if not batchable(cache):
            return ("alone", id(cache))
        return tuple((type(layer).__name__, tuple(layer.layout().items())) for layer in cache)

    def remove(self, sequence: Sequence, untaken: int = 0) -> list:
        """Take `sequence` out; returns its cache (holding its prompt and the tokens it handed out but the last one
        or two). `untaken`: tokens of its last round the caller did not use (speculative decoding forgets them)."""
        with mx.stream(generation_stream()):
            if sequence in self.waiting:
                self.waiting.remove(sequence)
                return sequence.cache
            if sequence.speculation is not None:
                if sequence in self.speculating:
                    self.speculating.remove(sequence)
                    sequence.speculation.stop(untaken)
                return sequence.cache
            lane = sequence.lane
            cache = lane.remove(sequence.row)
            if not lane.rows:
                self.lanes = {key: other for key, other in self.lanes.items() if other is not lane}
            return cache


def copied(cache: list) -> list:
    """A copy of the cache, evaluated now (so that the original's next write is still made in place)."""
    copy = [layer.copy() for layer in cache]
    mx.eval([layer.state for layer in copy])
    return copy

"""The generation worker: one thread owns the model and runs queued jobs one at a time; HTTP threads wait on steps."""

from __future__ import annotations

import queue
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from ..generation.stream import Options, encode_images, generate_ids
from ..generation.streams import generation_stream, release_thread_streams
from .prompt_cache import Entry, PromptCacheStore

DONE, STOP = object(), object()
POLL_SECONDS = 0.05


class QueueFull(Exception):
    """Every place in the waiting queue is taken."""


class ClientGone(Exception):
    """The HTTP client closed its connection; its job was cancelled."""


@dataclass
class Step:
    """One generated token in plain Python values (the HTTP thread never touches MLX arrays)."""

    text: str
    token: int
    finish: str | None
    prompt_tokens: int
    reused_tokens: int
    logprob: dict | None = None  # OpenAI's {token, logprob, bytes, top_logprobs} when logprobs were asked


@dataclass
class Job:
    """A prepared request: prompt ids, pixels of its images (or None) and checked options."""

    ids: list[int]
    pixels: np.ndarray | None
    options: Options
    top_logprobs: int | None = None  # None: no logprobs
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None

    def steps(self, client_gone: Callable[[], bool] = lambda: False) -> Iterator[Step]:
        """The job's steps as the worker makes them; raises the worker's error, or ClientGone (and cancels)."""
        while True:
            if client_gone():
                self.cancelled.set()
                raise ClientGone()
            try:
                event = self.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if event is DONE:
                return
            if isinstance(event, BaseException):
                raise event
            yield event


@dataclass
class Call:
    """A function to run on the worker's thread between jobs (the model belongs to that thread); its events: the
    function's result or error, then DONE."""

    function: Callable[[], object]
    events: queue.Queue = field(default_factory=queue.Queue)


class Worker:
    """The thread that owns the model; `max_queue` jobs may wait while one runs (0: no bound)."""

    def __init__(self, model, processor, max_queue: int = 0, store: PromptCacheStore | None = None):
        self.model, self.processor = model, processor
        self.store = store if store is not None else PromptCacheStore(0, 0)
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self.run, name="generation", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    def call(self, function: Callable[[], object]):
        """`function()` run on the worker's thread after the jobs queued before it: its result, or its error raised.
        Raises QueueFull when the queue is full."""
        call = Call(function)
        self.submit(call)
        result = call.events.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(self) -> None:
        self.jobs.put(STOP)
        self.thread.join(timeout=30)

    def run(self) -> None:
        try:
            while (job := self.jobs.get()) is not STOP:
                try:
                    if isinstance(job, Call):
                        job.events.put(job.function())
                    else:
                        self.generate(job)
                except Exception as e:  # noqa: BLE001 — the request's thread reports it
                    job.events.put(e)
                else:
                    job.events.put(DONE)
        finally:
            release_thread_streams()

    def generate(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        job.started_at = time.perf_counter()
        features = None
        if job.pixels is not None:
            with mx.stream(generation_stream()):
                features = encode_images(self.model, job.pixels, {})
        layout = cache_layout(job.options) if features is None else None
        if layout is None or not self.store.enabled:
            self.run_job(job, features, None, [])
            return
        cache, held = self.store.take(layout, job.ids)
        cache = cache if cache is not None else job.options.make_cache(self.model)
        entry = Entry(layout, [], cache)
        options = replace(job.options, prefill_progress=checkpointing(entry, cache, job.ids, job.options.prefill_progress))
        tokens = self.run_job(job, None, cache, held, options)
        entry.ids = held_ids(cache, [*job.ids, *tokens])
        self.store.put(entry)

    def run_job(self, job: Job, features, cache, held: list[int], options: Options | None = None) -> list[int]:
        """Generate the job's reply from `cache` holding `held` (a prefix of its ids); returns the tokens made."""
        fed, tokens = job.ids[len(held):], []
        with closing(generate_ids(self.model, self.processor, fed, cache, options or job.options, features,
                                  held)) as responses:
            for response in responses:
                tokens.append(response.token)
                if job.cancelled.is_set():
                    break
                job.first_token_at = job.first_token_at or time.perf_counter()
                job.events.put(self.step(response, job.top_logprobs, len(job.ids)))
        return tokens

    def step(self, response, top: int | None, prompt_tokens: int) -> Step:
        entry = None
        if top is not None and response.logprobs is not None and response.finish_reason != "stop":
            entry = self.logprob_entry(response.token, np.array(response.logprobs.astype(mx.float32)), top)
        return Step(response.text, response.token, response.finish_reason, prompt_tokens,
                    response.reused_tokens, entry)

    def logprob_entry(self, token: int, logprobs: np.ndarray, top: int) -> dict:
        best = np.argsort(-logprobs)[:top] if top else []
        return {**self.token_logprob(token, logprobs), "top_logprobs": [self.token_logprob(int(i), logprobs) for i in best]}

    def token_logprob(self, token: int, logprobs: np.ndarray) -> dict:
        piece = self.processor.tokenizer.decode([token])
        return {"token": piece, "logprob": float(logprobs[token]), "bytes": list(piece.encode())}


def cache_layout(options: Options) -> tuple | None:
    """What makes two requests' caches interchangeable; None: this request bypasses the prompt cache (a draft
    model keeps a cache of its own; a bounded max_kv_size cache is not exact under a different chunking)."""
    if options.draft_model is not None or options.max_kv_size is not None:
        return None
    return (options.kv_bits, options.kv_group_size, options.draft_tokens)


def checkpointing(entry: Entry, cache: list, ids: list[int], progress):
    """A prefill progress callback that also keeps a copy of the cache in `entry` once the prompt (all but its
    last token, which generation feeds) is in it."""

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        if done == total:
            entry.checkpoint = [layer.copy() for layer in cache]
            entry.checkpoint_ids = ids[: cache[0].offset]

    return report


def held_ids(cache: list, tokens: list[int]) -> list[int]:
    """The ids the cache holds (generation leaves the last token or two unfed): the first `offset` of `tokens`;
    [] when the cache does not add up (nothing is kept then)."""
    offsets = {layer.offset for layer in cache}
    if len(offsets) != 1 or not isinstance(offset := offsets.pop(), int) or offset > len(tokens):
        return []
    return tokens[:offset]

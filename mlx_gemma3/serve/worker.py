"""The generation worker: one thread owns the model and decodes the queued jobs as one batch; HTTP threads wait on steps.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np

from ..generation.batch import BatchGenerator, Row
from ..generation.text_stream import Options, encode_images, eos_ids, generate_ids, reply_piece, token_budget
from ..generation.thread_streams import generation_stream, release_thread_streams
from .prompt_cache import Entry, PromptCacheStore

DONE, STOP = object(), object()
POLL_SECONDS = 0.05
MAX_BATCH = 8


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
    ended: threading.Event = field(default_factory=threading.Event)  # the worker is done with it
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None
    generated: int = 0  # tokens the worker made for it (handed out or not)
    batch_peak: int = 0  # the most jobs it decoded together with (itself included)
    number: int = 0  # its place in the order the worker started jobs (how distributed ranks name it)

    def end(self, event=DONE) -> None:
        """The worker's last word on this job: DONE or the error that ended it."""
        self.events.put(event)
        self.ended.set()

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
    """A function to run on the worker's thread between batch steps (the model belongs to that thread); its one
    event: the function's result or its error."""

    function: Callable[[], object]
    events: queue.Queue = field(default_factory=queue.Queue)

    def run(self) -> None:
        try:
            self.events.put(self.function())
        except Exception as e:  # noqa: BLE001 — the caller's thread raises it
            self.events.put(e)


@dataclass
class Active:
    """A job decoding in the batch: its row and what turns the row's tokens into its reply."""

    job: Job
    row: Row
    detokenizer: object
    stop: set[int]
    max_tokens: int | None
    entry: Entry | None  # kept in the prompt cache when the job ends (None: this job bypasses it)
    reused: int  # prompt tokens the prompt cache served
    constraint: object = None  # the reply's structured-output constraint (its dead end ends the reply)


class Worker:
    """The thread that owns the model: up to `max_batch` jobs decode together (one forward per step for all),
    `max_queue` more may wait (0: no bound); a job joins after its own prefill and leaves when it ends.

    Distributed, `mirror` is rank 0's link to the other ranks (distributed/serving.py): before each model
    operation the worker sends what it decided (a job to join and the prompt cache entry it reuses, a step and
    the jobs cancelled before it), and the other ranks replay it on their own Worker (`replay`, no thread)."""

    def __init__(
        self,
        model,
        processor,
        max_queue: int = 0,
        store: PromptCacheStore | None = None,
        max_batch: int = MAX_BATCH,
        mirror=None,
        threaded: bool = True,
    ):
        self.model, self.processor, self.max_batch, self.mirror = model, processor, max_batch, mirror
        self.store = store if store is not None else PromptCacheStore(0, 0)
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.batch = BatchGenerator(model)
        self.active: dict[int, Active] = {}  # by id() of the row
        self.started = 0
        self.thread = threading.Thread(target=self.run, name="generation", daemon=True)
        if threaded:
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
            while self.admit():
                self.advance()
        finally:
            if self.mirror is not None:
                self.mirror.stop()
            release_thread_streams()

    def replay(self, command: tuple) -> None:
        """Do what rank 0's worker sent (a distributed follower): ("join", job fields, cache choice, kept entry
        keys) or ("step", numbers of the cancelled jobs, kept entry keys)."""
        kind, detail, kept = command[0], command[1:-1], command[-1]
        self.store.keep(kept)
        if kind == "join":
            fields, choice = detail
            self.start(Job(**fields), choice)
        else:
            self.advance(*detail)

    def admit(self) -> bool:
        """Start waiting jobs while the batch has room (waiting for one when nothing runs); False: stop."""
        while len(self.active) < self.max_batch:
            try:
                job = self.next_job()
            except queue.Empty:
                return True
            if job is STOP:
                return False
            if isinstance(job, Call):
                job.run()
            elif job.cancelled.is_set():
                job.end()
            else:
                self.start(job)
        return True

    def next_job(self):
        """The next queued job: waits for one when nothing decodes (raises queue.Empty when one decodes)."""
        if self.active or self.mirror is None:
            return self.jobs.get(block=not self.active)
        self.mirror.idle()
        return self.jobs.get()

    def start(self, job: Job, choice: tuple | None = None) -> None:
        job.started_at = time.perf_counter()
        if not job.number:
            self.started += 1
            job.number = self.started
        try:
            if batchable(job.options):
                self.join(job, choice)
            else:
                self.generate_alone(job)
                job.end()
        except Exception as e:  # noqa: BLE001 — the request's thread reports it
            self.check(e)
            job.end(e)

    def check(self, error: Exception) -> None:
        """Distributed, an error that says a rank went away ends the server (the mirror decides how)."""
        if self.mirror is not None:
            self.mirror.check(error)

    def join(self, job: Job, choice: tuple | None = None) -> None:
        """Prefill the job (from the prompt cache's best entry, or the one rank 0 chose) and add it to the batch."""
        opts = job.options
        layout = cache_layout(opts) if job.pixels is None and self.store.enabled else None
        if layout is not None and choice is None:
            choice = self.store.choose(layout, job.ids)
        if self.mirror is not None:
            self.mirror.join(job, choice, list(self.store.entries))
            opts = job.options  # with the seed every rank samples with
        features = self.features(job)
        cache, held = self.store.take(layout, job.ids, choice) if layout is not None else (None, [])
        cache = cache if cache is not None else opts.make_cache(self.model)
        context = self.model.config.text.max_position_embeddings
        budget, stop = token_budget(opts, context - len(job.ids)), eos_ids(self.processor, opts.stop_ids)
        detokenizer = self.processor.tokenizer.detokenizer()
        processors, constraint = opts.reply_processors(self.processor)
        progress = opts.prefill_progress if self.mirror is None else self.mirror.progress(opts.prefill_progress)
        row = self.batch.add(
            job.ids[len(held) :],
            cache,
            sampler=opts.sampler(),
            processors=processors,
            history=held,
            image_features=features,
            prefill_step_size=opts.prefill_step_size,
            progress=progress,
        )
        entry = None
        if layout is not None:  # the batch took a copy: `cache` itself, holding the whole prompt, is the checkpoint
            entry = Entry(layout, [], [], cache, held_ids(cache, job.ids))
        self.active[id(row)] = Active(job, row, detokenizer, stop, budget, entry, len(held), constraint)

    def features(self, job: Job):
        if job.pixels is None:
            return None
        with mx.stream(generation_stream()):
            return encode_images(self.model, job.pixels, {})

    def advance(self, cancelled: set[int] | None = None) -> None:
        """One step of the batch: every job gets its next token; the ended leave, and the jobs cancelled before
        the step (`cancelled`: their numbers, as rank 0 saw them)."""
        if not self.active:
            return
        if cancelled is None:
            cancelled = {active.job.number for active in self.active.values() if active.job.cancelled.is_set()}
        if self.mirror is not None:
            self.mirror.step(cancelled, list(self.store.entries))
        try:
            handed = self.batch.step()
        except Exception as e:  # noqa: BLE001 — every job of the batch reports it
            self.check(e)
            for active in self.active.values():
                active.job.end(e)
            self.active.clear()
            self.batch.clear()
            return
        for row, token, logprobs in handed:
            active = self.active[id(row)]
            active.job.generated += 1
            active.job.batch_peak = max(active.job.batch_peak, len(handed))
            if active.job.number in cancelled or self.hand_out(active, token, logprobs):
                self.finish(active)

    def hand_out(self, active: Active, token: int, logprobs: mx.array) -> bool:
        """Send the job its token's step; True when it was the last."""
        job = active.job
        text, finish = reply_piece(
            token, active.row.steps, active.detokenizer, active.stop, active.max_tokens, active.constraint
        )
        job.first_token_at = job.first_token_at or time.perf_counter()
        entry = None
        if job.top_logprobs is not None and finish != "stop":
            entry = self.logprob_entry(token, np.array(logprobs.astype(mx.float32)), job.top_logprobs)
        job.events.put(Step(text, token, finish, len(job.ids), active.reused, entry))
        return finish is not None

    def finish(self, active: Active) -> None:
        """The job leaves the batch; its cache goes to the prompt cache."""
        del self.active[id(active.row)]
        cache = self.batch.remove(active.row)
        if active.entry is not None:
            active.entry.cache = cache
            active.entry.ids = held_ids(cache, [*active.job.ids, *active.row.tokens])
            self.store.put(active.entry)
        active.job.end()

    def generate_alone(self, job: Job) -> None:
        """A job that cannot share a batch (speculative decoding, a max_kv_size cache) runs to its end alone."""
        features = self.features(job)
        layout = cache_layout(job.options) if features is None else None
        if layout is None or not self.store.enabled:
            self.run_job(job, features, None, [])
            return
        cache, held = self.store.take(layout, job.ids)
        cache = cache if cache is not None else job.options.make_cache(self.model)
        entry = Entry(layout, [], cache)
        options = replace(
            job.options, prefill_progress=checkpointing(entry, cache, job.ids, job.options.prefill_progress)
        )
        tokens = self.run_job(job, None, cache, held, options)
        entry.ids = held_ids(cache, [*job.ids, *tokens])
        self.store.put(entry)

    def run_job(self, job: Job, features, cache, held: list[int], options: Options | None = None) -> list[int]:
        """Generate the job's reply from `cache` holding `held` (a prefix of its ids); returns the tokens made."""
        fed, tokens = job.ids[len(held) :], []
        with closing(
            generate_ids(self.model, self.processor, fed, cache, options or job.options, features, held)
        ) as responses:
            for response in responses:
                tokens.append(response.token)
                job.generated, job.batch_peak = len(tokens), 1
                if job.cancelled.is_set():
                    break
                job.first_token_at = job.first_token_at or time.perf_counter()
                job.events.put(self.step(response, job.top_logprobs, len(job.ids)))
        return tokens

    def step(self, response, top: int | None, prompt_tokens: int) -> Step:
        entry = None
        if top is not None and response.logprobs is not None and response.finish_reason != "stop":
            entry = self.logprob_entry(response.token, np.array(response.logprobs.astype(mx.float32)), top)
        return Step(response.text, response.token, response.finish_reason, prompt_tokens, response.reused_tokens, entry)

    def logprob_entry(self, token: int, logprobs: np.ndarray, top: int) -> dict:
        best = np.argsort(-logprobs)[:top] if top else []
        return {
            **self.token_logprob(token, logprobs),
            "top_logprobs": [self.token_logprob(int(i), logprobs) for i in best],
        }

    def token_logprob(self, token: int, logprobs: np.ndarray) -> dict:
        piece = self.processor.tokenizer.decode([token])
        return {"token": piece, "logprob": float(logprobs[token]), "bytes": list(piece.encode())}


def batchable(options: Options) -> bool:
    """Whether a job can share the batch: speculative decoding and max_kv_size caches run alone."""
    return options.draft_tokens == 0 and options.max_kv_size is None


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

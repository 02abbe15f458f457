"""The generation worker: one thread owns the model and runs the scheduler's loop over every request; HTTP threads
wait on their job's steps (one per generated token).

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np

from ..generation.options import Options
from ..generation.prefix_reuse import held_keys, image_digests, prompt_keys
from ..generation.reply import Reply
from ..generation.scheduler import Generated, Scheduler, Sequence
from ..generation.step import PREFILL_STEP_SIZE, image_runs
from ..generation.text_stream import encode_images
from ..generation.thread_streams import generation_stream, release_thread_streams
from .prompt_cache import Entry, PromptCacheStore

DONE, STOP = object(), object()
POLL_SECONDS = 0.05
MAX_BATCH = 8
CLEAR_EVERY = 256  # iterations between returns of MLX's cached buffers to the system (also whenever it goes idle)


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
    """A function to run on the worker's thread between iterations (the model belongs to that thread); its one
    event: the function's result or its error."""

    function: Callable[[], object]
    events: queue.Queue = field(default_factory=queue.Queue)

    def run(self) -> None:
        try:
            self.events.put(self.function())
        except Exception as e:  # noqa: BLE001 — the caller's thread raises it
            self.events.put(e)


@dataclass
class Joining:
    """A job about to start, as rank 0 decided it: its options (with the seed every rank samples with, when
    distributed), its prompt's keys, the prompt-cache entry chosen for it and what was taken out of the store."""

    job: Job
    options: Options
    keys: list[int]
    choice: tuple | None
    cache: list | None
    held: list[int]


@dataclass(eq=False)
class Active:
    """A started job: its sequence in the scheduler, its reply, and what its prompt-cache entry needs."""

    job: Job
    sequence: Sequence
    reply: Reply
    keys: list[int]  # its prompt as prefix_reuse keys (images by content)
    reused: int  # prompt tokens the prompt cache served
    layout: tuple | None  # its prompt-cache layout (None: the store is off)


class Worker:
    """The thread that owns the model and runs one loop (generation/scheduler.py): each iteration every decoding
    job gets a token, and the first waiting prompt is prefilled by one chunk of at most `prefill_step_size`
    tokens. Up to `max_batch`
    jobs are started at once (prefilling or decoding), `max_queue` more may wait (0: no bound); a `Call` (the
    moderation endpoint) runs between two iterations.

    Distributed, `mirror` is rank 0's link to the other ranks (distributed/serving.py): before each iteration the
    worker sends what it decided (the jobs joining, with their seed and the prompt-cache entry each takes; the jobs
    cancelled; the entries kept), and the other ranks replay it on their own Worker (`replay`, no thread)."""

    def __init__(
        self,
        model,
        processor,
        max_queue: int = 0,
        store: PromptCacheStore | None = None,
        max_batch: int = MAX_BATCH,
        mirror=None,
        threaded: bool = True,
        prefill_step_size: int = PREFILL_STEP_SIZE,
    ):
        self.model, self.processor, self.max_batch, self.mirror = model, processor, max_batch, mirror
        self.store = store if store is not None else PromptCacheStore(0, 0)
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.scheduler = Scheduler(model, prefill_step_size)
        self.active: dict[Sequence, Active] = {}
        self.by_number: dict[int, Active] = {}  # the same, by job number (how rank 0 names cancelled jobs)
        self.started = 0
        self.iterations = 0
        self.thread = threading.Thread(target=self.run, name="generation", daemon=True)
        if threaded:
            self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    def call(self, function: Callable[[], object]):
        """`function()` run on the worker's thread between two iterations: its result, or its error raised.
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
            while (decided := self.decide()) is not None:
                self.iterate(*decided)
        finally:
            if self.mirror is not None:
                self.mirror.stop()
            release_thread_streams()

    def decide(self) -> tuple[list[Joining], set[int], tuple] | None:
        """Rank 0's decisions for the next iteration: the jobs joining (each with its options and the prompt-cache
        entry it takes, taken out of the store now so that a later job does not choose it too), the numbers of the
        jobs cancelled, and the store's entries before. Waits for a job when nothing runs; runs at most one queued
        Call while jobs run; None: stop."""
        kept, joining = tuple(self.store.entries), []
        while len(self.active) + len(joining) < self.max_batch:
            try:
                job = self.next_job(wait=not self.active and not joining)
            except queue.Empty:
                break
            if job is STOP:
                return None
            if isinstance(job, Call):
                job.run()
                if self.active or joining:
                    break  # one call per iteration: the running jobs wait at most that long
                continue
            if job.cancelled.is_set():
                job.end()
                continue
            options = job.options
            if self.mirror is not None and options.seed is None:  # each rank would draw its own: rank 0 draws it
                options = replace(options, seed=random.getrandbits(32))
            keys = self.keys(job)
            choice = self.store.choose(options.cache_layout, keys) if self.store.enabled else None
            joining.append(self.joining(job, options, keys, choice))
        cancelled = {active.job.number for active in self.active.values() if active.job.cancelled.is_set()}
        return joining, cancelled, kept

    def next_job(self, wait: bool):
        """The next queued job or call (waiting for one when `wait`; raises queue.Empty otherwise)."""
        if wait and self.mirror is not None:
            self.mirror.idle()
        return self.jobs.get(block=wait)

    def replay(self, decided) -> None:
        """Do what rank 0's worker decided for one iteration (a distributed follower): `decided.kept`,
        `.cancelled`, `.joins` (each with its job's fields, its options and its prompt-cache choice)."""
        self.store.keep(decided.kept)
        joining = []
        for join in decided.joins:
            job = Job(list(join.ids), join.pixels, join.options, join.top_logprobs, number=join.number)
            joining.append(self.joining(job, join.options, self.keys(job), join.choice))
        self.iterate(joining, set(decided.cancelled), decided.kept)

    def joining(self, job: Job, options: Options, keys: list[int], choice) -> Joining:
        """The job about to join, numbered, with the prompt-cache entry `choice` names taken out of the store."""
        if not job.number:
            self.started += 1
            job.number = self.started
        cache, held = self.store.take(options.cache_layout, keys, choice) if choice is not None else (None, [])
        return Joining(job, options, keys, choice, cache, held)

    def iterate(self, joining: list[Joining], cancelled: set[int], kept: tuple) -> None:
        """One iteration: the cancelled leave, the joining start, every started job advances (scheduler.iterate),
        each generated token goes to its job; the ended leave."""
        if self.mirror is not None:
            self.mirror.iteration(joining, cancelled, kept)
        for number in cancelled:
            if number in self.by_number:
                self.finish(self.by_number[number])
        for join in joining:
            self.start(join)
        if not self.active:
            return
        try:
            outcome = self.scheduler.iterate()
        except Exception as e:  # noqa: BLE001 — the scheduler's state is unknown: every job reports it
            self.check(e)
            for active in list(self.active.values()):
                self.end(active, e)
            self.scheduler = Scheduler(self.model, self.scheduler.prefill_step_size)
            return
        for sequence, error in outcome.failed:
            self.check(error)
            self.end(self.active[sequence], error)
        self.hand_out(outcome.generated)
        self.iterations += 1
        if not self.active or self.iterations % CLEAR_EVERY == 0:
            mx.clear_cache()

    def check(self, error: Exception) -> None:
        """Distributed, an error that says a rank went away ends the server (the mirror decides how)."""
        if self.mirror is not None:
            self.mirror.check(error)

    def keys(self, job: Job) -> list[int]:
        vision = self.model.config.vision
        return prompt_keys(job.ids, vision.image_token_id if vision else None, image_digests(job.pixels))

    def start(self, join: Joining) -> None:
        """Give the job to the scheduler, from the prompt-cache entry taken for it or an empty cache; only the
        images after what the entry holds are encoded."""
        job, options = join.job, join.options
        job.started_at = time.perf_counter()
        try:
            reused = len(join.held)
            cache = join.cache if join.cache is not None else options.make_cache(self.model)
            context = self.model.config.text.max_position_embeddings
            reply = Reply(self.processor, options, context - len(job.ids))
            sequence = Sequence(
                job.ids[reused:],
                cache,
                options.sampler(),
                tuple(reply.processors),
                history=job.ids[:reused],
                features=self.features(job, reused),
                draft_tokens=options.draft_tokens,
                draft_model=options.draft_model,
                draft_cache=None if options.draft_model is None else options.make_cache(options.draft_model),
                max_tokens=reply.max_tokens,
                chunk=options.prefill_step_size,
                progress=options.prefill_progress,
                keep_prompt_cache=self.store.enabled,
            )
            self.scheduler.add(sequence)
        except Exception as e:  # noqa: BLE001 — the request's thread reports it
            self.check(e)
            job.end(e)
            return
        layout = options.cache_layout if self.store.enabled else None
        active = Active(job, sequence, reply, join.keys, reused, layout)
        self.active[sequence] = self.by_number[job.number] = active

    def features(self, job: Job, reused: int):
        """The features of the job's images that the reused prefix does not hold (None: none)."""
        if job.pixels is None:
            return None
        seen = sum(first < reused for first, _ in image_runs(job.ids, self.model.config.vision.image_token_id))
        if seen == len(job.pixels):
            return None
        with mx.stream(generation_stream()):
            return encode_images(self.model, job.pixels[seen:], {})

    def hand_out(self, generated: list[Generated]) -> None:
        """Each token to its job as a Step; a job whose reply ended leaves (a speculative round's later tokens are
        then not used)."""
        decoding = self.scheduler.decoding
        for i, made in enumerate(generated):
            active = self.active.get(made.sequence)
            if active is None:
                continue  # it ended earlier in this round
            job, reply = active.job, active.reply
            job.generated += 1
            job.batch_peak = max(job.batch_peak, decoding)
            text = reply.add(made.token)
            job.first_token_at = job.first_token_at or time.perf_counter()
            entry = None
            if job.top_logprobs is not None and reply.finish != "stop":
                entry = self.logprob_entry(made.token, np.array(made.logprobs.astype(mx.float32)), job.top_logprobs)
            job.events.put(Step(text, made.token, reply.finish, len(job.ids), active.reused, entry))
            if reply.finish is not None:
                untaken = sum(1 for later in generated[i + 1 :] if later.sequence is made.sequence)
                self.finish(active, untaken)

    def finish(self, active: Active, untaken: int = 0) -> None:
        """The job leaves the scheduler; its caches go to the prompt cache."""
        self.forget(active)
        cache = self.scheduler.remove(active.sequence, untaken)
        sequence = active.sequence
        if active.layout is not None:
            held = held_keys(cache, [*active.keys, *active.reply.tokens])
            checkpoint = sequence.prompt_cache
            checkpoint_ids = held_keys(checkpoint, active.keys) if checkpoint is not None else None
            if checkpoint_ids is None:
                checkpoint = None
            if held is not None:
                self.store.put(Entry(active.layout, held, cache, checkpoint, checkpoint_ids))
            elif checkpoint is not None:
                self.store.put(Entry(active.layout, checkpoint_ids, checkpoint))
        active.job.end()

    def end(self, active: Active, error: Exception) -> None:
        """The job failed (the scheduler has dropped it): it ends with the error, its caches not kept."""
        self.forget(active)
        active.job.end(error)

    def forget(self, active: Active) -> None:
        del self.active[active.sequence]
        del self.by_number[active.job.number]

    def logprob_entry(self, token: int, logprobs: np.ndarray, top: int) -> dict:
        best = np.argsort(-logprobs)[:top] if top else []
        return {
            **self.token_logprob(token, logprobs),
            "top_logprobs": [self.token_logprob(int(i), logprobs) for i in best],
        }

    def token_logprob(self, token: int, logprobs: np.ndarray) -> dict:
        piece = self.processor.tokenizer.decode([token])
        return {"token": piece, "logprob": float(logprobs[token]), "bytes": list(piece.encode())}


def distributable(options: Options) -> bool:
    """Whether a distributed server serves these options (speculative decoding and max_kv_size caches: one process
    only; the draft model is not sharded)."""
    return options.draft_tokens == 0 and options.max_kv_size is None

"""The generation worker: one thread owns the model and runs queued jobs one at a time; HTTP threads wait on steps."""

from __future__ import annotations

import queue
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from ..generation.stream import Options, encode_images, generate_ids
from ..generation.streams import generation_stream, release_thread_streams

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


class Worker:
    """The thread that owns the model; `max_queue` jobs may wait while one runs (0: no bound)."""

    def __init__(self, model, processor, max_queue: int = 0):
        self.model, self.processor = model, processor
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self.run, name="generation", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    def stop(self) -> None:
        self.jobs.put(STOP)
        self.thread.join(timeout=30)

    def run(self) -> None:
        try:
            while (job := self.jobs.get()) is not STOP:
                try:
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
        with closing(generate_ids(self.model, self.processor, job.ids, None, job.options, features)) as responses:
            for response in responses:
                if job.cancelled.is_set():
                    return
                job.first_token_at = job.first_token_at or time.perf_counter()
                job.events.put(self.step(response, job.top_logprobs))

    def step(self, response, top: int | None) -> Step:
        entry = None
        if top is not None and response.logprobs is not None and response.finish_reason != "stop":
            entry = self.logprob_entry(response.token, np.array(response.logprobs.astype(mx.float32)), top)
        return Step(response.text, response.token, response.finish_reason, response.prompt_tokens,
                    response.reused_tokens, entry)

    def logprob_entry(self, token: int, logprobs: np.ndarray, top: int) -> dict:
        best = np.argsort(-logprobs)[:top] if top else []
        return {**self.token_logprob(token, logprobs), "top_logprobs": [self.token_logprob(int(i), logprobs) for i in best]}

    def token_logprob(self, token: int, logprobs: np.ndarray) -> dict:
        piece = self.processor.tokenizer.decode([token])
        return {"token": piece, "logprob": float(logprobs[token]), "bytes": list(piece.encode())}

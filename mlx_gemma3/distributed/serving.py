"""The distributed server and chat: rank 0 decides, the other ranks replay its decisions on their share of the model.

Before each iteration of its loop, rank 0's worker sends what it decided (`share_object`, ordered with the
model's own collectives) as one frozen `Iteration`: the jobs joining (their prompt ids, pixels, options with an
explicit seed, and the prompt-cache entry each takes), the jobs cancelled, and the prompt-cache entries kept; a
`Shutdown` ends the server. The others run the same Worker and scheduler code on those decisions, so every rank
runs the same forwards, samples the same tokens and keeps the same prompt cache entries. While a rank waits for
requests (or a person) its stall guard is paused.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from .group import Watchdog, is_peer_failure, peer_failure_message, share_object


@dataclass(frozen=True)
class Join:
    """A job joining, as the other ranks start it."""

    number: int
    ids: tuple[int, ...]
    pixels: np.ndarray | None
    options: object  # generation Options, with the seed every rank samples with
    top_logprobs: int | None
    choice: tuple | None  # the prompt-cache entry it takes (PromptCacheStore.choose on rank 0)


@dataclass(frozen=True)
class Iteration:
    """Rank 0's decisions for one iteration of the worker's loop."""

    joins: tuple[Join, ...]
    cancelled: frozenset[int]  # numbers of the jobs that leave before it
    kept: tuple[int, ...]  # keys of the prompt-cache entries kept (the others were evicted)


@dataclass(frozen=True)
class Shutdown:
    """The server stops."""


class Follower:
    """A rank > 0's side of its Worker: it only replays, so it sends nothing; a lost rank is raised to the command
    line. Both sides pause the stall guard while idle and pet it per prefill chunk."""

    def __init__(self, guard: Watchdog):
        self.guard = guard

    def iteration(self, joining: list, cancelled: set[int], kept: tuple) -> None:
        pass

    def stop(self) -> None:
        pass

    def idle(self) -> None:
        self.guard.pause()

    def check(self, error: Exception) -> None:
        if is_peer_failure(error):
            raise error


class Leader(Follower):
    """Rank 0's side: sends the worker's decisions; a rank that went away ends the whole server."""

    def __init__(self, group, guard: Watchdog):
        super().__init__(guard)
        self.group = group
        guard.pause()

    def iteration(self, joining: list, cancelled: set[int], kept: tuple) -> None:
        """Send the worker's decisions (its Joining records: job, options, prompt-cache choice) before it acts."""
        joins = tuple(
            Join(
                join.job.number, tuple(join.job.ids), join.job.pixels, join.options, join.job.top_logprobs, join.choice
            )
            for join in joining
        )
        self.send(Iteration(joins, frozenset(cancelled), tuple(kept)))

    def stop(self) -> None:
        try:
            self.send(Shutdown())
        except RuntimeError as e:  # the others are gone already: nothing left to tell them
            print(f"note: {peer_failure_message(e)}", file=sys.stderr)

    def send(self, message: Iteration | Shutdown) -> None:
        self.guard.pet()
        try:
            share_object(message, self.group)
        except RuntimeError as e:
            self.check(e)
            raise

    def check(self, error: Exception) -> None:
        """The worker thread cannot end the process by raising: a lost rank ends it here, with one message."""
        if is_peer_failure(error):
            print(f"error: {peer_failure_message(error)}", file=sys.stderr, flush=True)
            os._exit(1)


def follow(worker, group, guard: Watchdog) -> None:
    """Replay rank 0's decisions on `worker` (made with a Follower mirror, no thread) until rank 0 stops."""
    while True:
        guard.pause()
        message = share_object(None, group)
        guard.pet()
        if isinstance(message, Shutdown):
            return
        worker.replay(message)

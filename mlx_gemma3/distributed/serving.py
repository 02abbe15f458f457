"""The distributed server and chat: rank 0 decides, the other ranks replay its decisions on their share of the model.

Rank 0's worker sends each decision before the model work it starts (`share_object`, ordered with the model's
own collectives): a job joining the batch (its prompt ids, pixels, options with an explicit seed, and the prompt
cache entry it reuses), a step (and the jobs cancelled before it), the server stopping. The others run the same
Worker code on those decisions, so every rank computes the same batch, samples the same tokens and keeps the
same prompt cache entries. While a rank waits for requests (or a person) its stall guard is paused.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import os
import random
import sys
from dataclasses import replace

from .group import Watchdog, is_peer_failure, peer_failure_message, share_object


class Follower:
    """A rank > 0's side of its Worker: it only replays, so it sends nothing; a lost rank is raised to the command
    line. Both sides pause the stall guard while idle and pet it per prefill chunk."""

    def __init__(self, guard: Watchdog):
        self.guard = guard

    def join(self, job, choice: tuple | None, kept: list) -> None:
        pass

    def step(self, cancelled: set[int], kept: list) -> None:
        pass

    def stop(self) -> None:
        pass

    def idle(self) -> None:
        self.guard.pause()

    def progress(self, report):
        return self.guard.petting(report)

    def check(self, error: Exception) -> None:
        if is_peer_failure(error):
            raise error


class Leader(Follower):
    """Rank 0's side: sends the worker's decisions; a rank that went away ends the whole server."""

    def __init__(self, group, guard: Watchdog):
        super().__init__(guard)
        self.group = group
        guard.pause()

    def join(self, job, choice: tuple | None, kept: list) -> None:
        if job.options.seed is None:  # each rank would draw its own seed: rank 0 draws it for all
            job.options = replace(job.options, seed=random.getrandbits(32))
        fields = {
            "ids": job.ids,
            "pixels": job.pixels,
            "options": job.options,
            "top_logprobs": job.top_logprobs,
            "number": job.number,
        }
        self.send(("join", fields, choice, kept))

    def step(self, cancelled: set[int], kept: list) -> None:
        self.send(("step", cancelled, kept))

    def stop(self) -> None:
        try:
            self.send(("stop",))
        except RuntimeError as e:  # the others are gone already: nothing left to tell them
            print(f"note: {peer_failure_message(e)}", file=sys.stderr)

    def send(self, command: tuple) -> None:
        self.guard.pet()
        try:
            share_object(command, self.group)
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
        command = share_object(None, group)
        guard.pet()
        if command[0] == "stop":
            return
        worker.replay(command)

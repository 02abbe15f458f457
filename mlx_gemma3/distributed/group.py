"""Joining the mx.distributed group: a bounded wait for the peers, a shared random seed, failures as clear errors.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import Gemma3Error
from ..generation.thread_streams import generation_stream

MODES = ("pipeline", "tensor")
CONNECT_TIMEOUT_S = 30.0  # the peers' processes start and reach each other within this
LOAD_TIMEOUT_S = 600.0  # every rank has read its share of the weights within this
STALL_TIMEOUT_S = 20.0  # a prefill chunk or a token takes less than this on every rank
STALL_TIMEOUT_VARIABLE = "MLX_GEMMA3_STALL_TIMEOUT"  # seconds, for models or links slower than that
# What MLX's backends say when a peer goes away (the ring backend: "[ring] connection to a peer was lost").
PEER_FAILURES = ("connection to a peer", "closed by the peer", "send/recv errors")
# The watchdog process: ends its parent with a message unless a byte arrives on its stdin every TIMEOUT seconds
# (after a "p" it waits without a limit: the parent is idle on purpose); stops when the parent closes the pipe
# (or dies). A process, because MLX's waits hold the parent's GIL.
WATCHDOG = """
import os, select, signal, sys
parent, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
paused = False
while True:
    ready, _, _ = select.select([0], [], [], None if paused else timeout)
    if not ready:
        print(message, file=sys.stderr, flush=True)
        os.kill(parent, signal.SIGKILL)
        break
    data = os.read(0, 4096)
    if not data:
        break
    paused = data.endswith(b"p")
"""


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise Gemma3Error(f"distributed must be one of {', '.join(MODES)}, got {mode!r}")


def connect(timeout_s: float = CONNECT_TIMEOUT_S) -> mx.distributed.Group:
    """The group this process belongs to (started by mlx.launch, or with MLX_HOSTFILE and MLX_RANK set). A peer
    that does not answer within `timeout_s` ends this process with one error line: MLX's own wait has no end."""
    message = (
        f"error: the other ranks did not answer within {timeout_s:.0f} s: start every rank (mlx.launch --hosts ... or "
        "--hostfile ...) and check that the hosts reach each other on the hostfile's addresses and ports"
    )
    with Watchdog(timeout_s, message):
        group = mx.distributed.init(strict=True)
        share_seed(group)
    return group


def barrier(group: mx.distributed.Group, timeout_s: float, what: str) -> None:
    """Wait until every rank gets here; a rank that never does ends this one with an error naming `what`."""
    message = f"error: rank {group.rank()}: the other ranks did not finish {what} within {timeout_s:.0f} s"
    with Watchdog(timeout_s, message):
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))


class Watchdog:
    """A child process that kills this one, after printing `message`, unless `pet()` comes every `timeout_s`:
    a peer that dies can leave MLX waiting forever (e.g. the ring backend's recv), with Python's threads blocked."""

    def __init__(self, timeout_s: float, message: str):
        self.timeout_s, self.message = timeout_s, message
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Watchdog:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(self.timeout_s), self.message], stdin=subprocess.PIPE
        )
        return self

    def pet(self, *_) -> None:
        self.process.stdin.write(b".")
        self.process.stdin.flush()

    def pause(self) -> None:
        """No limit until the next pet: this rank now waits on purpose (for a person, or for requests)."""
        self.process.stdin.write(b"p")
        self.process.stdin.flush()

    def petting(self, progress=None):
        """A prefill progress callback that pets this guard, then calls `progress` (if any)."""

        def report(done: int, total: int) -> None:
            self.pet()
            if progress is not None:
                progress(done, total)

        return report

    def __exit__(self, *_) -> None:
        self.process.stdin.close()
        self.process.wait()


def stall_guard(mode: str | None):
    """For a command line's generation: a Watchdog that each token and prefill chunk pets (None when not
    distributed)."""
    if not mode:
        return None
    limit = stall_timeout()
    return Watchdog(
        limit,
        f"error: rank {rank(mode)}: no progress for {limit:g} s: another rank stopped or the link "
        f"between them is down; ending this rank (a slower model or link: raise {STALL_TIMEOUT_VARIABLE})",
    )


def stall_timeout() -> float:
    """STALL_TIMEOUT_S, or the seconds $MLX_GEMMA3_STALL_TIMEOUT gives."""
    text = os.environ.get(STALL_TIMEOUT_VARIABLE)
    if text is None:
        return STALL_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise Gemma3Error(f"{STALL_TIMEOUT_VARIABLE} must be a positive number of seconds, got {text!r}")
    return value


def share_object(value, group: mx.distributed.Group):
    """Rank 0's `value` (any picklable object), returned on every rank; the others pass None. Two all_sums on
    this thread's stream (the others add zeros), so it is ordered with the model's own collectives. The ranks
    are one program started together by one user: what arrives is what rank 0 itself made."""
    with mx.stream(generation_stream()):
        return _share(value, group)


def _share(value, group: mx.distributed.Group):
    leader = group.rank() == 0
    data = np.frombuffer(pickle.dumps(value), np.uint8) if leader else np.zeros(0, np.uint8)
    size = int(mx.distributed.all_sum(mx.array([data.size if leader else 0], mx.int32), group=group).item())
    part = mx.array(data) if leader else mx.zeros((size,), mx.uint8)
    shared = np.array(mx.distributed.all_sum(part, group=group))  # rank 0 too: every rank takes part in both sums
    return value if leader else pickle.loads(shared.tobytes())


def launched_with_peers() -> bool:
    """Whether mlx.launch (ring: a non-empty hostfile; JACCL: its coordinator) or mpirun started several ranks."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    has_ring = bool(hostfile) and os.path.isfile(hostfile) and os.path.getsize(hostfile) > 1
    return (
        has_ring or bool(os.environ.get("MLX_JACCL_COORDINATOR")) or int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1)) > 1
    )


def share_seed(group: mx.distributed.Group) -> None:
    """Seed every rank's generator with rank 0's draw, so that sampling draws the same token on every rank."""
    draw = mx.random.randint(0, 2**31 - 1, (1,))
    seed = mx.distributed.all_sum(draw if group.rank() == 0 else mx.zeros_like(draw), group=group)
    mx.random.seed(int(seed.item()))


def is_peer_failure(error: BaseException) -> bool:
    """Whether an MLX error says that another rank of the group went away."""
    return isinstance(error, RuntimeError) and any(text in str(error) for text in PEER_FAILURES)


def peer_failure_message(error: BaseException) -> str:
    return f"another rank stopped or became unreachable ({error}): every rank ends; see the other ranks' errors"


def rank(mode: str | None) -> int:
    """This process's rank (0 when not distributed): only rank 0 prints."""
    return mx.distributed.init().rank() if mode and launched_with_peers() else 0


def weights_per_rank(model) -> list[int]:
    """Bytes of text-tower weights each rank holds (a collective: every rank calls it)."""
    text = model.language_model if hasattr(model, "language_model") else model
    held = sum(v.nbytes for _, v in tree_flatten(text.parameters()))
    if not launched_with_peers():
        return [held]
    return mx.distributed.all_gather(mx.array([held], mx.int64)).tolist()

"""Joining the mx.distributed group: a bounded wait for the peers, a shared random seed, failures as clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx

from ..errors import Gemma3Error

MODES = ("pipeline", "tensor")
CONNECT_TIMEOUT_S = 30.0  # the peers' processes start and reach each other within this
# What MLX's backends say when a peer goes away (the ring backend: "[ring] connection to a peer was lost").
PEER_FAILURES = ("connection to a peer", "closed by the peer", "[ring]", "[mpi]", "[jaccl]")
WATCHDOG = """
import os, signal, sys, time
time.sleep(float(sys.argv[2]))
print(sys.argv[3], file=sys.stderr, flush=True)
os.kill(int(sys.argv[1]), signal.SIGKILL)
"""


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise Gemma3Error(f"distributed must be one of {', '.join(MODES)}, got {mode!r}")


def connect(timeout_s: float = CONNECT_TIMEOUT_S) -> mx.distributed.Group:
    """The group this process belongs to (started by mlx.launch, or with MLX_HOSTFILE and MLX_RANK set). A peer
    that does not answer within `timeout_s` ends this process with one error line: MLX's own wait has no end."""
    if not os.environ.get("MLX_HOSTFILE") and not os.environ.get("OMPI_COMM_WORLD_SIZE"):
        return mx.distributed.init()  # one process: a group of one
    message = (
        f"error: the other ranks did not answer within {timeout_s:.0f} s: start every rank (mlx.launch --hosts ... or "
        "--hostfile ...) and check that the hosts reach each other on the hostfile's addresses and ports"
    )
    watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(timeout_s), message])
    try:
        group = mx.distributed.init(strict=True)
        share_seed(group)
    finally:
        watchdog.kill()
        watchdog.wait()
    return group


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

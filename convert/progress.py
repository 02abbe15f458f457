"""A one-line progress bar for the converter, drawn only on a terminal.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import sys

WIDTH = 30
MB = 1024 * 1024


class Progress:
    """`advance(nbytes)` as work is done, `close()` at the end; silent unless `stream` is a TTY."""

    def __init__(self, total_bytes: int, label: str, stream=None):
        self.total = max(int(total_bytes), 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.shown: int | None = None  # the permille last drawn
        self.active = _is_tty(self.stream)
        self._draw()

    def advance(self, nbytes: int) -> None:
        self.done = min(self.done + int(nbytes), self.total) if self.total else self.done + int(nbytes)
        self._draw()

    def close(self) -> None:
        """Finish the line (at 100% when all the work was done); safe to call twice."""
        if self.active:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self.active = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    def _draw(self) -> None:
        permille = int(self._fraction() * 1000)
        if not self.active or permille == self.shown:
            return
        self.shown = permille
        self.stream.write("\r" + self.line())
        self.stream.flush()

    def line(self) -> str:
        fraction = self._fraction()
        filled = int(fraction * WIDTH)
        bar = "#" * filled + "-" * (WIDTH - filled)
        return f"{self.label} [{bar}] {fraction * 100:5.1f}% {self.done / MB:.1f}/{self.total / MB:.1f} MB"


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False

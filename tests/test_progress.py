"""The converter's progress bar: `\\r` updates on a terminal, nothing at all elsewhere."""

from __future__ import annotations

import io

from mlx_gemma3.convert.progress import Progress

MB = 1024 * 1024


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_carriage_return_updates():
    stream = FakeTTY()
    bar = Progress(4 * MB, "converting", stream=stream)
    for _ in range(4):
        bar.advance(MB)
    bar.close()
    text = stream.getvalue()
    lines = text.split("\r")[1:]
    assert len(lines) == 5  # 0%, 25%, 50%, 75%, 100%
    assert lines[0].startswith("converting [") and "0.0%" in lines[0] and "0.0/4.0 MB" in lines[0]
    assert "50.0%" in lines[2] and "2.0/4.0 MB" in lines[2]
    assert lines[-1] == "converting [" + "#" * 30 + "] 100.0% 4.0/4.0 MB\n"
    assert text.count("\n") == 1


def test_a_terminal_is_not_flooded_by_tiny_steps():
    stream = FakeTTY()
    with Progress(10 * MB, "x", stream=stream) as bar:
        for _ in range(10_000):
            bar.advance(MB // 1000)
    assert stream.getvalue().count("\r") <= 1001


def test_a_pipe_or_file_stays_empty():
    stream = io.StringIO()
    bar = Progress(4 * MB, "converting", stream=stream)
    bar.advance(2 * MB)
    bar.close()
    assert stream.getvalue() == ""


def test_a_stream_without_isatty_stays_silent():
    class Sink:
        written = ""

        def write(self, text):
            self.written += text

    sink = Sink()
    with Progress(MB, "x", stream=sink) as bar:
        bar.advance(MB)
    assert sink.written == ""


def test_overshoot_and_zero_total_stay_within_100_percent():
    stream = FakeTTY()
    with Progress(MB, "x", stream=stream) as bar:
        bar.advance(3 * MB)
    assert "100.0% 1.0/1.0 MB" in stream.getvalue()
    empty = FakeTTY()
    with Progress(0, "x", stream=empty) as bar:
        bar.advance(0)
    assert "100.0%" in empty.getvalue() and empty.getvalue().count("\n") == 1


def test_close_twice_ends_the_line_once():
    stream = FakeTTY()
    bar = Progress(MB, "x", stream=stream)
    bar.close()
    bar.close()
    assert stream.getvalue().count("\n") == 1

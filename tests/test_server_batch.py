"""Continuous batching in the server, as a real process with the openai client: concurrent streaming requests (text of
different lengths, an image, one client that disconnects) each get the reply they get alone, decoded together."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import threading

import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

LONG = 400  # the disconnecting request could run this long


def data_url(color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def requests() -> list[dict]:
    texts = [(f"Tell me about number {i}.", n) for i, n in enumerate((7, 19, 33, 50))]
    asks = [dict(messages=[{"role": "user", "content": text}], max_tokens=n) for text, n in texts]
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": data_url("teal")}}]
    asks.append(dict(messages=[{"role": "user", "content": image}], max_tokens=25))
    asks.append(dict(messages=[{"role": "user", "content": "Talk for a long time."}], max_tokens=LONG))
    return asks


@pytest.fixture(scope="module")
def server(image_chat_model):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_gemma3.server",
            "--model",
            str(image_chat_model[0]),
            "--port",
            "0",
            "--max-batch",
            "8",
            "--prompt-cache-size",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = process.stderr.readline()
    assert line.startswith("serving"), line
    port = int(line.rsplit(":", 1)[1].split("/")[0])
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120), process
    process.terminate()
    process.wait(timeout=30)


def streamed(client, ask: dict, stop_after: int | None = None) -> tuple[str, str | None, int]:
    """(text, finish reason, chunks read) of a streaming request; with `stop_after`, the client hangs up then."""
    stream = client.chat.completions.create(model="tiny", stream=True, **ask)
    text, finish, chunks = "", None, 0
    for chunk in stream:
        chunks += 1
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
        if stop_after is not None and chunks == stop_after:
            stream.close()
            break
    return text, finish, chunks


def test_concurrent_streams_equal_their_replies_alone(server):
    client, process = server
    asks = requests()
    alone = [streamed(client, ask) for ask in asks]
    assert alone[-1][1] == "length" and alone[-1][2] > 100  # the long reply would run far past the disconnect
    results: list = [None] * len(asks)
    start = threading.Barrier(len(asks))

    def send(i: int) -> None:
        start.wait()
        results[i] = streamed(client, asks[i], stop_after=4 if i == len(asks) - 1 else None)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(asks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for i in range(len(asks) - 1):
        assert results[i][:2] == alone[i][:2], i
    assert results[-1][2] == 4

    log = read_log(process, expected=2 * len(asks))
    together = [line for line in log[len(asks) :]]
    peaks = [int(m.group(1)) for line in together if (m := re.search(r"batch of up to (\d+)", line))]
    assert max(peaks) >= 4, together  # the requests really were decoded together
    gone = [line for line in together if "client gone" in line]
    assert len(gone) == 1, together
    stopped = int(re.search(r"stopped after (\d+) generated tokens", gone[0]).group(1))
    assert stopped < 60 < LONG, gone  # the disconnected request left the batch within a few tokens


def read_log(process, expected: int) -> list[str]:
    """The server's request lines (one per request, written when it ends), the first `expected` of them."""
    lines = []
    while len(lines) < expected:
        line = process.stderr.readline()
        assert line, lines
        if "POST /v1/chat/completions" in line:
            lines.append(line)
    return lines

"""The server's prompt cache on the real 270M (sliding window 512): a chat replayed the way clients send it, the whole
history every turn, to about 2,000 tokens; every turn reuses the whole previous prompt, far past the window, and
replies as a server without the cache does."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.slow

WORDS = "river mountain quiet engine silver garden letter window market harbor winter lantern orchard".split()
HISTORY = 2000


def user_message(turn: int) -> str:
    rng = random.Random(turn)
    return f"Note {turn}: " + " ".join(rng.choice(WORDS) for _ in range(240)) + ". Summarise the note."


def serving(folder: Path, *options: str):
    """A server process on the folder: (process, openai client)."""
    command = [sys.executable, "-m", "mlx_gemma3.server", "--model", str(folder), "--port", "0", *options]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = ""
    while not line.startswith("serving"):
        line = process.stderr.readline()
        assert line, "the server ended before serving"
    port = int(line.rsplit(":", 1)[1].split("/")[0])
    return process, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def clients(lossless_conversion):
    """Two servers on the real 270M: the prompt cache on (the default), and off."""
    started = [serving(lossless_conversion.folder), serving(lossless_conversion.folder, "--prompt-cache-size", "0")]
    yield [client for _, client in started]
    for process, _ in started:
        process.terminate()
        process.wait(timeout=30)


def test_a_long_chat_reuses_the_whole_previous_prompt_every_turn(clients):
    """Every turn is served from the previous turn's cache; the last one, which reuses keys and values from every
    turn before it, replies as a server that computes its whole prompt afresh (greedy: any difference in what the
    cache held would show as other tokens). Only the last turn is replayed: a fresh 2,000-token prefill of the
    270M costs about two minutes of CPU time on two CI cores."""
    cached, uncached = clients
    messages, previous = [], None
    while previous is None or previous.prompt_tokens < HISTORY:
        messages.append({"role": "user", "content": user_message(len(messages))})
        reply = cached.chat.completions.create(model="270m", messages=messages, max_tokens=8, temperature=0.0)
        usage = reply.usage
        cached_tokens = usage.prompt_tokens_details.cached_tokens
        if previous is None:
            assert cached_tokens == 0
        else:  # the previous prompt and its reply, up to where the re-rendered reply differs from the generated one
            assert previous.prompt_tokens <= cached_tokens < usage.prompt_tokens
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        previous = usage
    assert len(messages) >= 2 * 6 and previous.prompt_tokens >= HISTORY > 3 * 512
    afresh = uncached.chat.completions.create(model="270m", messages=messages[:-1], max_tokens=8, temperature=0.0)
    assert afresh.usage.prompt_tokens_details.cached_tokens == 0 and afresh.usage.prompt_tokens == usage.prompt_tokens
    assert afresh.choices[0].message.content == messages[-1]["content"]

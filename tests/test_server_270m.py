"""The server's prompt cache on the real 270M (sliding window 512): a chat replayed the way clients send it, the whole
history every turn, to about 2,000 tokens; every turn reuses the whole previous prompt, far past the window."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import openai
import pytest

pytestmark = pytest.mark.slow

WORDS = "river mountain quiet engine silver garden letter window market harbor winter lantern orchard".split()
HISTORY = 2000


def user_message(turn: int) -> str:
    rng = random.Random(turn)
    return f"Note {turn}: " + " ".join(rng.choice(WORDS) for _ in range(240)) + ". Summarise the note."


@pytest.fixture(scope="module")
def client(lossless_conversion):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_gemma3.server", "--model", str(lossless_conversion.folder), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = ""
    while not line.startswith("serving"):
        line = process.stderr.readline()
        assert line, "the server ended before serving"
    port = int(line.rsplit(":", 1)[1].split("/")[0])
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    process.terminate()
    process.wait(timeout=30)


def test_a_long_chat_reuses_the_whole_previous_prompt_every_turn(client):
    messages, previous = [], None
    while previous is None or previous.prompt_tokens < HISTORY:
        messages.append({"role": "user", "content": user_message(len(messages))})
        reply = client.chat.completions.create(model="270m", messages=messages, max_tokens=8, temperature=0.0)
        usage = reply.usage
        cached = usage.prompt_tokens_details.cached_tokens
        if previous is None:
            assert cached == 0
        else:  # the previous prompt and its reply, up to where the re-rendered reply differs from the generated one
            assert previous.prompt_tokens <= cached < usage.prompt_tokens
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        previous = usage
    assert len(messages) >= 2 * 6 and previous.prompt_tokens >= HISTORY > 3 * 512

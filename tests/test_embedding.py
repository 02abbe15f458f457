"""Embedding in apps: a worker thread with a callback and cancel, two models side by side, no import side effects,
the tool loop, and the examples."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import pytest
import torch
from conftest import StepCounter as Counter
from conftest import log_softmax, random_ids, tiny_text_model

import mlx_gemma3
from mlx_gemma3.generation.background import BackgroundGeneration
from mlx_gemma3.generation.thread_streams import release_thread_streams
from mlx_gemma3.processing.prompt import prompt_ids
from mlx_gemma3.processing.tools import run_tools

ROOT = Path(__file__).parent.parent


def reference_text(reference, processor, prompt, max_tokens: int) -> str:
    ids = prompt_ids(processor, prompt)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=[1, 106], pad_token_id=0
        )
    return processor.tokenizer.decode([t for t in out[0, len(ids) :].tolist() if t not in (1, 106)])


def test_worker_thread_cancel_stops_within_a_few_tokens(tiny_chat_model):
    folder, _, reference = tiny_chat_model
    model, processor = mlx_gemma3.load(folder)
    counter, chunks = Counter(wake_at=5), []
    job = BackgroundGeneration(
        model, processor, "Tell me a story", on_text=chunks.append, max_tokens=900, logits_processors=[counter]
    )
    assert counter.reached.wait(timeout=60)
    job.cancel()
    at_cancel = counter.steps
    job.wait(timeout=60)
    assert job.done and job.finish_reason == "cancelled" and counter.steps <= at_cancel + 3
    assert "".join(chunks) == job.text
    assert mlx_gemma3.generate(model, processor, "Hello", max_tokens=10) == reference_text(
        reference, processor, "Hello", 10
    )


def test_two_models_side_by_side_in_threads(tiny_chat_model, tmp_path):
    import numpy as np
    from conftest import convert
    from spm_fixture import train_tokenizer

    from mlx_gemma3.generation.text_stream import stream_generate

    folder, _, reference = tiny_chat_model
    other_reference = tiny_text_model(seed=21)
    other_reference.save_pretrained(tmp_path / "hf")
    train_tokenizer(tmp_path / "hf")
    models = [mlx_gemma3.load(folder), mlx_gemma3.load(convert(tmp_path / "hf", tmp_path / "mlx"))]
    prompt = random_ids(24, seed=4)[0].tolist()
    results = [None] * 4

    def run(i):
        results[i] = np.stack([np.array(r.logprobs) for r in stream_generate(*models[i % 2], prompt, max_tokens=6)])
        release_thread_streams()  # a thread that ran MLX work drops its streams before it ends

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for i, hf in enumerate((reference, other_reference)):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=6,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                eos_token_id=None,
                pad_token_id=0,
            )
        expected = log_softmax(torch.stack(out.logits, dim=1)[0].float().numpy())
        assert np.abs(results[i] - expected).max() <= 1e-4 and np.abs(results[i + 2] - expected).max() <= 1e-4
    assert np.abs(results[0] - results[1]).max() > 1  # two different models


def test_import_changes_nothing_global():
    script = (
        "import logging, warnings, sys, numpy, mlx.core as mx  # our dependencies set their own filters\n"
        "from PIL import Image, ImageFile\n"
        "before = (str(mx.default_device()), str(mx.default_stream(mx.default_device())), list(warnings.filters),"
        " Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, logging.getLogger().handlers[:], sys.getrecursionlimit())\n"
        "import mlx_gemma3, mlx_gemma3.serve.http, mlx_gemma3.processing.tools, mlx_gemma3.processing.image, mlx_gemma3.generation.background\n"
        "after = (str(mx.default_device()), str(mx.default_stream(mx.default_device())), list(warnings.filters),"
        " Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, logging.getLogger().handlers[:], sys.getrecursionlimit())\n"
        "print(before == after)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stderr


class Script:
    """A logits processor that makes each new reply say the next scripted text (then end its turn)."""

    def __init__(self, tokenizer, replies: list[str]):
        self.replies = [tokenizer.encode(r, add_bos=False) + [106] for r in replies]
        self.turn, self.start, self.last = -1, 0, None

    def __call__(self, tokens, logits):
        if self.last is None or tokens.size != self.last + 1:
            self.turn, self.start = self.turn + 1, tokens.size
        self.last = tokens.size
        reply = self.replies[min(self.turn, len(self.replies) - 1)]
        token = reply[min(tokens.size - self.start, len(reply) - 1)]
        return mx.where(mx.arange(logits.shape[-1]) == token, 1e4, logits)


@pytest.mark.slow
def test_run_tools_loop(tiny_chat_model):
    folder, _, _ = tiny_chat_model
    model, processor = mlx_gemma3.load(folder)
    seen = []

    def get_weather(city: str) -> dict:
        """Weather for a city."""
        seen.append(city)
        return {"city": city, "sky": "clear"}

    script = Script(processor.tokenizer, ['[get_weather(city="Seoul")]', "It is clear."])
    chat = mlx_gemma3.Chat(model, processor, max_tokens=40, logits_processors=[script])
    run = run_tools(chat, "Weather in Seoul?", [get_weather], max_rounds=3)
    assert seen == ["Seoul"] and run.reply == "It is clear." and not run.exhausted and len(run.rounds) == 1
    assert "```tool_output" in chat.messages[2]["content"] and '"get_weather"' in chat.messages[0]["content"]
    looping = Script(processor.tokenizer, ['[get_weather(city="Paris")]'])
    run = run_tools(
        mlx_gemma3.Chat(model, processor, max_tokens=40, logits_processors=[looping]),
        "Paris?",
        [get_weather],
        max_rounds=2,
    )
    assert run.exhausted and len(run.rounds) == 2  # the bound holds when the model keeps calling


@pytest.mark.slow
def test_examples_run(tiny_chat_model):
    folder, _, _ = tiny_chat_model
    for example, extra in (("app_worker.py", ["--cancel-after", "0.2"]), ("tool_agent.py", [])):
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / example), "--model", str(folder), *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr


def test_callbacks_arrive_from_the_worker_thread(tiny_chat_model):
    folder, _, _ = tiny_chat_model
    model, processor = mlx_gemma3.load(folder)
    threads = set()
    job = BackgroundGeneration(
        model, processor, "Hi", on_text=lambda _: threads.add(threading.get_ident()), max_tokens=8
    )
    job.wait(timeout=60)
    assert threads and threading.get_ident() not in threads

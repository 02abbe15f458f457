"""generate_step, the public step loop, and the one MLX stream each thread keeps for generation."""

from __future__ import annotations

import re
import threading

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_TEXT, greedy_reference

import mlx_gemma3
from mlx_gemma3.generation.thread_streams import release_thread_streams

NEW_TOKENS = 40


@pytest.fixture(scope="module")
def tiny(converted_tiny):
    return greedy_reference(converted_tiny(seed=3), 2 * TINY_TEXT["sliding_window"] + 3, NEW_TOKENS, 8)


def test_a_custom_sampler_gets_transformers_greedy_tokens(tiny):
    model, _, prompt, expected_tokens, expected_logprobs = tiny
    shapes = []

    def sampler(logprobs):
        shapes.append(logprobs.shape)
        return mx.argmax(logprobs, axis=-1)

    steps = mlx_gemma3.generate_step(model, prompt, model.make_cache(), sampler=sampler, prefill_step_size=5)
    got = [next(steps) for _ in range(NEW_TOKENS)]
    steps.close()
    assert [token for token, _ in got] == expected_tokens
    assert np.abs(np.stack([np.array(lp) for _, lp in got]) - expected_logprobs).max() <= 1e-4
    assert shapes[0] == (1, TINY_TEXT["vocab_size"]) and got[0][1].shape == (TINY_TEXT["vocab_size"],)


def test_max_tokens_ends_the_loop_and_processors_see_every_token(tiny):
    model, _, prompt, expected_tokens, _ = tiny
    seen = []

    def record(tokens, logits):
        seen.append(tokens.tolist())
        return logits

    steps = list(mlx_gemma3.generate_step(model, prompt, model.make_cache(), logits_processors=[record], max_tokens=5))
    assert [token for token, _ in steps] == expected_tokens[:5]
    assert seen == [prompt + expected_tokens[:n] for n in range(5)]


def test_a_cache_with_history_continues_like_one_pass(tiny):
    model, _, prompt, expected_tokens, expected_logprobs = tiny
    cache = model.make_cache()
    first = list(mlx_gemma3.generate_step(model, prompt, cache, max_tokens=3))
    history = prompt + [token for token, _ in first]
    cache_tokens = cache[0].offset
    assert cache_tokens == len(history) - 1  # the last token is fed with the next prompt
    rest = list(mlx_gemma3.generate_step(model, [history[-1]], cache, history=history[:-1], max_tokens=NEW_TOKENS - 3))
    assert [t for t, _ in first + rest] == expected_tokens
    assert np.abs(np.stack([np.array(lp) for _, lp in rest]) - expected_logprobs[3:]).max() <= 1e-4


def test_an_empty_prompt_is_refused(tiny):
    model = tiny[0]
    with pytest.raises(mlx_gemma3.Gemma3Error, match="at least one prompt token"):
        next(mlx_gemma3.generate_step(model, [], model.make_cache()))


def stream_index() -> int:
    """The index MLX gives the next stream it makes (streams are numbered in order of creation)."""
    return int(re.search(r"(\d+)\)$", str(mx.new_stream(mx.default_device()))).group(1))


def many_calls(model, processor) -> tuple[int, int]:
    """Stream indices before and after 200 generate calls and 50 Chat turns in this thread."""
    before = stream_index()
    for _ in range(200):
        mlx_gemma3.generate(model, processor, "Hello", max_tokens=2)
    chat = mlx_gemma3.Chat(model, processor, max_tokens=2)
    for turn in range(50):
        if turn % 10 == 0:
            chat.reset()  # keeps the conversation inside the tiny model's context
        chat.send(f"turn {turn}")
    return before, stream_index()


@pytest.mark.slow
def test_generation_reuses_one_stream_per_thread(tiny_chat_model):
    model, processor = mlx_gemma3.load(tiny_chat_model[0])
    before, after = many_calls(model, processor)
    assert after - before <= 3
    found = {}

    def worker():
        found["indices"] = many_calls(model, processor)
        release_thread_streams()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=600)
    before, after = found["indices"]
    assert after - before <= 3


def test_prefill_evaluates_every_cached_array(tiny, monkeypatch):
    """Each prompt chunk leaves keys and values evaluated (values left lazy chain every chunk's inputs)."""
    from mlx.utils import tree_flatten

    from mlx_gemma3.generation.step import prefill

    model = tiny[0]
    cache = model.make_cache()
    real_eval, evaluated = mx.eval, []
    monkeypatch.setattr(mx, "eval", lambda *args: evaluated.append(len(tree_flatten(args))) or real_eval(*args))
    prefill(model, list(range(3, 43)), cache, 16)
    monkeypatch.undo()
    assert {len(layer.state) for layer in cache} == {2}  # keys and values
    assert evaluated == [2 * len(cache)] * 3

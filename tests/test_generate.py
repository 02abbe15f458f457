"""stream_generate against transformers' greedy generate: tokens and per-step logits for every prefill chunking."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_TEXT, greedy_fixture, random_ids

import mlx_gemma3
from mlx_gemma3.generation.text_stream import generate, stream_generate

WINDOW = TINY_TEXT["sliding_window"]
NEW_TOKENS = 100


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return greedy_fixture(tmp_path_factory.mktemp("gen"), 1, 3 * WINDOW, NEW_TOKENS, 5)


@pytest.mark.parametrize("chunk", [1, 7, WINDOW - 1, WINDOW, WINDOW + 1, None])
@pytest.mark.slow
def test_greedy_tokens_and_logits_match_transformers(tiny, chunk):
    model, processor, prompt, expected_tokens, expected_logits = tiny
    assert len(expected_tokens) == NEW_TOKENS and not {1, 106} & set(expected_tokens)  # the reference ran 100 steps
    step = chunk or len(prompt)
    responses = list(stream_generate(model, processor, prompt, max_tokens=NEW_TOKENS, prefill_step_size=step))
    assert [r.token for r in responses] == expected_tokens
    ours = np.stack([np.array(r.logprobs) for r in responses])
    assert np.abs(ours - expected_logits).max() <= 1e-4
    assert responses[-1].finish_reason == "length" and all(r.finish_reason is None for r in responses[:-1])
    assert responses[-1].generation_tokens == NEW_TOKENS and responses[-1].prompt_tokens == len(prompt)


def test_stops_on_every_eos_id(tiny):
    model, processor, prompt, expected_tokens, _ = tiny
    for stop in (expected_tokens[4], expected_tokens[9]):
        responses = list(stream_generate(model, processor, prompt, max_tokens=50, stop_ids=(stop,)))
        assert responses[-1].finish_reason == "stop" and responses[-1].token == stop
        assert len(responses) == expected_tokens.index(stop) + 1


def test_eos_and_end_of_turn_end_a_reply(tiny):
    model, processor, prompt, _, _ = tiny
    for eos in (1, 106):

        def force(tokens, logits, eos=eos):
            return mx.where(mx.arange(logits.shape[-1]) == eos, 100.0, logits)

        responses = list(stream_generate(model, processor, prompt, max_tokens=5, logits_processors=[force]))
        assert [r.token for r in responses] == [eos] and responses[0].finish_reason == "stop"


def test_closing_the_generator_cancels(tiny):
    model, processor, prompt, expected_tokens, _ = tiny
    cache = model.make_cache()
    stream = stream_generate(model, processor, prompt, cache=cache, max_tokens=NEW_TOKENS)
    assert [next(stream).token for _ in range(3)] == expected_tokens[:3]
    stream.close()
    assert cache[0].offset <= len(prompt) + 3


def test_seeded_sampling_is_reproducible(tiny):
    model, processor, prompt, _, _ = tiny
    flatter = [lambda tokens, logits: logits / 10]  # with temp 2: as flat as temp 20, so seeds 7 and 8 differ
    runs = [
        [
            r.token
            for r in stream_generate(
                model, processor, prompt, max_tokens=20, temp=2.0, seed=s, logits_processors=flatter
            )
        ]
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_prompt_beyond_the_context_is_refused(tiny):
    model, processor, _, _, _ = tiny
    too_long = random_ids(TINY_TEXT["max_position_embeddings"] + 1)[0].tolist()
    with pytest.raises(mlx_gemma3.Gemma3Error, match="context is 1024"):
        generate(model, processor, too_long)


def test_bad_options_are_refused(tiny):
    model, processor, prompt, _, _ = tiny
    for bad in (dict(max_tokens=0), dict(temp=-1), dict(top_p=0), dict(repetition_penalty=0)):
        with pytest.raises(mlx_gemma3.Gemma3Error):
            generate(model, processor, prompt, **bad)

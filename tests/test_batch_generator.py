"""Continuous batching: rows join after their own prefill and leave when done; each row's tokens and log-probabilities
are those of its run alone (generate_step), with one model forward per step for the whole batch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_TEXT, random_ids

import mlx_gemma3
from mlx_gemma3.generation.batch import BatchGenerator
from mlx_gemma3.generation.sample import Sampler, repetition_penalty

WINDOW = TINY_TEXT["sliding_window"]


class Counted:
    """The model, counting its forward calls."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@pytest.fixture(scope="module")
def model(converted_tiny):
    return mlx_gemma3.load(converted_tiny(seed=7).folder)[0]


def penalty(seen, logits):
    return repetition_penalty(logits, seen[None], 1.3)


def flatten(seen, logits):  # the tiny model is too sure of itself for sampling to matter
    return logits * 0.05


# (prompt length, steps, sampler settings, processors, the batch step at which the row joins)
REQUESTS = [
    (9, 24, dict(), (), 0),
    (WINDOW + 11, 10, dict(temp=1.0, seed=3), (flatten,), 0),
    (4, 30, dict(), (penalty,), 2),
    (2 * WINDOW + 5, 12, dict(temp=0.8, top_k=20, seed=5), (flatten, penalty), 5),
    (6, 8, dict(temp=1.0, top_p=0.9, seed=8), (flatten,), 9),
]


def alone(model, prompt, steps, sampling, processors):
    out = mlx_gemma3.generate_step(
        model, prompt, model.make_cache(), sampler=Sampler(**sampling), logits_processors=processors, max_tokens=steps
    )
    got = list(out)
    return [token for token, _ in got], np.stack([np.array(lp) for _, lp in got])


@pytest.mark.slow
def test_rows_joining_and_leaving_decode_as_alone_in_one_forward_per_step(model):
    prompts = [random_ids(n, seed=30 + i)[0].tolist() for i, (n, *_) in enumerate(REQUESTS)]
    expected = [alone(model, p, steps, sampling, procs) for p, (_, steps, sampling, procs, _) in zip(prompts, REQUESTS)]
    counted = Counted(model)
    batch = BatchGenerator(counted)
    got = {i: ([], []) for i in range(len(REQUESTS))}
    rows, step = {}, 0
    while len(rows) < len(REQUESTS) or len(batch):
        for i, (_, _, sampling, procs, join_at) in enumerate(REQUESTS):
            if join_at == step and i not in rows:
                rows[i] = batch.add(
                    prompts[i], model.make_cache(), sampler=Sampler(**sampling), processors=procs, prefill_step_size=7
                )
        before = counted.calls
        handed = batch.step()
        assert counted.calls - before == (1 if handed else 0)  # one forward per step, whatever the batch size
        for row, token, logprobs in handed:
            i = next(k for k, r in rows.items() if r is row)
            got[i][0].append(token)
            got[i][1].append(np.array(logprobs))
            if row.steps == REQUESTS[i][1]:
                cache = batch.remove(row)
                assert {layer.offset for layer in cache} == {len(prompts[i]) + row.steps}
        step += 1
    for i, (tokens, logprobs) in got.items():
        assert tokens == expected[i][0], i
        assert np.abs(np.stack(logprobs) - expected[i][1]).max() <= 1e-4, i


def test_a_removed_row_continues_alone_from_its_cache(model):
    prompt = random_ids(WINDOW + 3, seed=41)[0].tolist()
    tokens, _ = alone(model, prompt, 12, {}, ())
    batch = BatchGenerator(model)
    other = batch.add(random_ids(5, seed=42)[0].tolist(), model.make_cache(), sampler=Sampler(), prefill_step_size=64)
    row = batch.add(prompt, model.make_cache(), sampler=Sampler(), prefill_step_size=64)
    for _ in range(6):
        handed = batch.step()
    assert [t for r, t, _ in handed if r is row] == [row.tokens[-1]] and row.tokens == tokens[:6]
    cache = batch.remove(row)
    assert batch.rows == [other]
    rest = list(mlx_gemma3.generate_step(model, [tokens[5]], cache, history=prompt + tokens[:5], max_tokens=6))
    assert [t for t, _ in rest] == tokens[6:]


def test_rows_join_in_place_and_the_timeline_drops_slots_no_row_holds(model):
    long_prompt, short_prompt = random_ids(300, seed=43)[0].tolist(), random_ids(5, seed=44)[0].tolist()
    tokens, logprobs = alone(model, short_prompt, 12, {}, ())
    batch = BatchGenerator(model)
    long_row = batch.add(long_prompt, model.make_cache(), sampler=Sampler(), prefill_step_size=64)
    room = [layer.room() for layer in batch.cache]
    row = batch.add(short_prompt, model.make_cache(), sampler=Sampler(), prefill_step_size=64)
    assert [layer.padding for layer in batch.cache if layer.window is None][0] == [0, 295]  # right-aligned in place
    got = []
    for _ in range(4):
        got += [(t, np.array(lp)) for r, t, lp in batch.step() if r is row]
    batch.remove(long_row)
    full = [layer for layer in batch.cache if layer.window is None]
    assert all(layer.padding == [0] and layer.inner.offset == 5 + 4 for layer in full)  # 295 unused slots dropped
    assert [layer.room() for layer in batch.cache] == [2 * r for r in room]  # the room doubled once, for the join
    while len(got) < 12:
        got += [(t, np.array(lp)) for r, t, lp in batch.step() if r is row]
    assert [t for t, _ in got] == tokens
    assert np.abs(np.stack([lp for _, lp in got]) - logprobs).max() <= 1e-4

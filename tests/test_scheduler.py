"""The scheduler's one loop: every kind of sequence (greedy and sampled batch rows, a row with processors, a
max_kv_size row, prompt lookup, a sampling draft model) joins while others decode and long prompts prefill a
chunk budget per iteration; each sequence's tokens and log-probabilities are those of its run alone."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_ids
from test_speculative import converted

import mlx_gemma3
from mlx_gemma3.generation.sample import Sampler, repetition_penalty
from mlx_gemma3.generation.scheduler import Scheduler, Sequence
from mlx_gemma3.generation.speculative import speculative_generate_step

WINDOW = 8  # test_speculative's models
BUDGET = 6  # prompt tokens prefilled per iteration
K = 3  # tokens drafted per round


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(target, a draft that often agrees with it): test_speculative's tiny models, window 8."""
    target, _, hf = converted(tmp_path_factory.mktemp("target"), 0)
    near, _, _ = converted(tmp_path_factory.mktemp("near"), 0, noise_from=hf)
    return target, near


def penalty(seen, logits):
    return repetition_penalty(logits, seen[None], 1.3)


def repetitive(n: int, seed: int) -> list[int]:
    """A prompt that repeats itself, so prompt lookup finds drafts."""
    part = random_ids(7, seed=seed)[0].tolist()
    return (part * (n // 7 + 1))[:n]


# name: (prompt, tokens, iteration it arrives at, sampler settings, processors, cache options, drafting)
PLAN = {
    "greedy": (random_ids(9, seed=30)[0].tolist(), 40, 0, {}, (), {}, None),
    "long, sampled": (random_ids(5 * WINDOW + 3, seed=31)[0].tolist(), 12, 0, dict(temp=1.0, seed=3), (), {}, None),
    "mid-prefill, penalty": (random_ids(WINDOW + 4, seed=32)[0].tolist(), 16, 2, {}, (penalty,), {}, None),
    "max_kv_size": (random_ids(3 * WINDOW + 1, seed=33)[0].tolist(), 24, 1, {}, (), dict(max_kv_size=12), None),
    "prompt lookup": (repetitive(24, seed=34), 20, 1, {}, (), {}, "lookup"),
    "draft, sampled": (random_ids(12, seed=35)[0].tolist(), 20, 3, dict(temp=1.0, top_k=20, seed=5), (), {}, "draft"),
}


def alone(models, name: str) -> tuple[list[int], np.ndarray]:
    target, near = models
    prompt, tokens, _, sampling, processors, cache_options, drafting = PLAN[name]
    if drafting is None:
        cache = target.make_cache(**cache_options)
        steps = mlx_gemma3.generate_step(
            target,
            prompt,
            cache,
            sampler=Sampler(**sampling),
            logits_processors=processors,
            max_tokens=tokens,
            prefill_step_size=BUDGET,
        )
        made = [(token, logprobs) for token, logprobs in steps]
    else:
        draft = near if drafting == "draft" else None
        steps = speculative_generate_step(
            target,
            draft,
            prompt,
            target.make_cache(rewind=K + 1),
            None if draft is None else draft.make_cache(rewind=K + 1),
            num_draft_tokens=K,
            sampler=Sampler(**sampling),
            max_tokens=tokens,
            prefill_step_size=BUDGET,
        )
        made = [(token, logprobs) for token, logprobs, _ in steps]
    return [token for token, _ in made], np.stack([np.array(logprobs) for _, logprobs in made])


def sequence(models, name: str, fed: list) -> Sequence:
    target, near = models
    prompt, tokens, _, sampling, processors, cache_options, drafting = PLAN[name]
    draft = near if drafting == "draft" else None
    return Sequence(
        list(prompt),
        target.make_cache(rewind=K + 1, **cache_options),
        Sampler(**sampling),
        processors,
        draft_tokens=K if drafting else 0,
        draft_model=draft,
        draft_cache=None if draft is None else draft.make_cache(rewind=K + 1),
        max_tokens=tokens,
        progress=lambda done, total: fed.append((name, done)),
    )


@pytest.mark.slow
def test_every_kind_of_sequence_in_one_loop_equals_its_run_alone(models):
    expected = {name: alone(models, name) for name in PLAN}
    scheduler = Scheduler(models[0], prefill_step_size=BUDGET)
    got = {name: ([], []) for name in PLAN}
    names, fed, iteration, timeline = {}, [], 0, []
    while len(names) < len(PLAN) or len(scheduler):
        for name, (_, _, arrives, *_) in PLAN.items():
            if arrives == iteration:
                seq = sequence(models, name, fed)
                names[seq] = name
                scheduler.add(seq)
        fed.clear()
        outcome = scheduler.iterate()
        assert not outcome.failed
        handed = {}
        for made in outcome.generated:
            name = names[made.sequence]
            got[name][0].append(made.token)
            got[name][1].append(np.array(made.logprobs))
            handed[name] = handed.get(name, 0) + 1
            if len(got[name][0]) == PLAN[name][1]:
                scheduler.remove(made.sequence)
        prefilled = {}
        for name, done in fed:
            prefilled[name] = done
        timeline.append((handed, dict(prefilled)))
        iteration += 1
        assert iteration < 200
    for name, (tokens, logprobs) in got.items():
        assert tokens == expected[name][0], name
        assert np.abs(np.stack(logprobs) - expected[name][1]).max() <= 1e-4, name

    # the long prompt was read a budget per iteration while the greedy row got a token at every one of them
    reading = [i for i, (_, prefilled) in enumerate(timeline) if "long, sampled" in prefilled]
    assert len(reading) >= len(PLAN["long, sampled"][0]) // BUDGET - 1
    first_greedy = min(i for i, (handed, _) in enumerate(timeline) if "greedy" in handed)
    assert all(timeline[i][0].get("greedy") == 1 for i in reading if i >= first_greedy)
    # speculative rounds ran one per iteration beside the batch, some handing out several tokens at once
    assert max(handed.get("prompt lookup", 0) for handed, _ in timeline) > 1

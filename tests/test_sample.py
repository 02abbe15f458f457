"""Samplers and processors against transformers' logits warpers and processors on random logits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma3.generation.sample import Sampler, logit_bias, repetition_penalty


def random_logits(seed=0, batch=3, vocab=200):
    return np.random.RandomState(seed).randn(batch, vocab).astype(np.float32) * 3


def transformers_filter(logits: np.ndarray, temp, top_k, top_p, min_p) -> np.ndarray:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = [TemperatureLogitsWarper(temp)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    scores = torch.tensor(logits)
    for warper in warpers:
        scores = warper(None, scores)
    return scores.numpy()


@pytest.mark.parametrize(
    "temp, top_k, top_p, min_p",
    [
        (1.0, 0, 1.0, 0.0),
        (0.7, 64, 1.0, 0.0),
        (1.0, 0, 0.95, 0.0),
        (1.3, 0, 1.0, 0.1),
        (1.0, 64, 0.95, 0.05),
        (0.5, 5, 0.5, 0.0),
    ],
)
def test_filter_matches_transformers(temp, top_k, top_p, min_p):
    logits = random_logits()
    ours = np.array(Sampler(temp, top_k, top_p, min_p, seed=0).filter(mx.array(logits)))
    ref = transformers_filter(logits, temp, top_k, top_p, min_p)
    assert np.array_equal(np.isinf(ours), np.isinf(ref))
    kept = ~np.isinf(ref)
    assert np.abs(ours[kept] - ref[kept]).max() <= 1e-5


def test_greedy_and_seeded_sampling():
    logits = mx.array(random_logits())
    assert Sampler()(logits).tolist() == np.argmax(random_logits(), axis=-1).tolist()
    a, b = Sampler(1.0, 64, 0.95, seed=7), Sampler(1.0, 64, 0.95, seed=7)
    assert [a(logits).tolist() for _ in range(5)] == [b(logits).tolist() for _ in range(5)]


def test_sampling_only_draws_kept_tokens():
    logits = random_logits(batch=1)
    sampler = Sampler(1.0, top_k=3, seed=1)
    allowed = set(np.argsort(logits[0])[-3:].tolist())
    assert {int(sampler(mx.array(logits)).item()) for _ in range(40)} <= allowed


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = random_logits()
    seen = np.random.RandomState(1).randint(0, 200, size=(3, 12))
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(seen), torch.tensor(logits)).numpy()
    ours = np.array(repetition_penalty(mx.array(logits), mx.array(seen), 1.3))
    assert np.abs(ours - ref).max() <= 1e-6


def test_logit_bias_matches_transformers():
    from transformers.generation.logits_process import SequenceBiasLogitsProcessor

    logits = random_logits()
    bias = {5: 10.0, 17: -4.5}
    ref = SequenceBiasLogitsProcessor({(k,): v for k, v in bias.items()})(
        torch.zeros(3, 1, dtype=torch.long), torch.tensor(logits)
    ).numpy()
    assert np.abs(np.array(logit_bias(mx.array(logits), bias)) - ref).max() <= 1e-6

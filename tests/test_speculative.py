"""Speculative decoding (draft model and prompt lookup): the target's own tokens and distribution, every time."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import convert, random_ids, reference_torch, tiny_text_model

import mlx_gemma3
from mlx_gemma3.generation.sample import Sampler
from mlx_gemma3.generation.speculative import accept_sampled, lookup, speculative_generate_step

NEW_TOKENS = 200
SHAPE = dict(sliding_window=8, head_dim=32, query_pre_attn_scalar=32)  # head_dim 32: 8-bit KV in groups of 32


def converted(folder, seed: int, noise_from=None, **overrides):
    """A tiny model whose embeddings are scaled down (at full scale a random Gemma only repeats its last token);
    `noise_from`: a near copy of that model's weights instead (a draft that agrees often, not always)."""
    torch = reference_torch()
    hf = tiny_text_model(seed=seed, **{**SHAPE, **overrides})
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        if noise_from is not None:
            for mine, theirs in zip(hf.parameters(), noise_from.parameters()):
                mine.copy_(theirs + 0.05 * theirs.std() * torch.randn(theirs.shape, generator=gen))
        else:
            hf.model.embed_tokens.weight.mul_(0.1)
    hf.save_pretrained(folder / "hf")
    model, processor = mlx_gemma3.load(convert(folder / "hf", folder / "mlx"))
    return model, processor, hf


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(target, processor, near draft, other draft): same 512-token vocabulary, window 8."""
    target, processor, hf = converted(tmp_path_factory.mktemp("target"), 0)
    near, _, _ = converted(tmp_path_factory.mktemp("near"), 0, noise_from=hf)
    other, _, _ = converted(tmp_path_factory.mktemp("other"), 1)
    return target, processor, near, other


PROMPT = random_ids(20, seed=3)[0].tolist()  # longer than the window: the rings wrap during the prompt


def target_alone(model, prompt, tokens=NEW_TOKENS, **cache_options):
    steps = mlx_gemma3.generate_step(model, prompt, model.make_cache(**cache_options), max_tokens=tokens)
    return [(token, np.array(logprobs)) for token, logprobs in steps]


def speculative(model, draft, prompt, k, tokens=NEW_TOKENS, **cache_options):
    cache = model.make_cache(rewind=k + 1, **cache_options)
    draft_cache = None if draft is None else draft.make_cache(rewind=k + 1, **cache_options)
    steps = speculative_generate_step(model, draft, prompt, cache, draft_cache, num_draft_tokens=k, max_tokens=tokens)
    return [(token, np.array(logprobs), from_draft) for token, logprobs, from_draft in steps]


def drafter(models, name):
    target, _, near, other = models
    return {"near": near, "other": other, "itself": target, "lookup": None}[name]


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("name", ["near", "itself", "lookup"])
def test_greedy_output_is_the_targets_own(models, name, k):
    target = models[0]
    expected = target_alone(target, PROMPT)
    got = speculative(target, drafter(models, name), PROMPT, k)
    assert [t for t, *_ in got] == [t for t, _ in expected]
    assert np.abs(got[0][1] - expected[0][1]).max() <= 1e-4
    assert max(np.abs(g[1] - e[1]).max() for g, e in zip(got, expected)) <= 1e-3
    from_draft = sum(f for *_, f in got)
    if name == "itself":  # every draft stands: rounds of k + 1 tokens
        assert NEW_TOKENS - from_draft == math.ceil(NEW_TOKENS / (k + 1))
    if name == "near":
        assert 0 < from_draft < NEW_TOKENS - math.ceil(NEW_TOKENS / (k + 1))  # some rejected, some accepted


@pytest.mark.slow
@pytest.mark.parametrize("name", ["other", "lookup"])
def test_greedy_with_8_bit_kv_is_the_targets_own(models, name):
    target = models[0]
    kv = dict(kv_bits=8, kv_group_size=32)
    expected = target_alone(target, PROMPT, 60, **kv)
    got = speculative(target, drafter(models, name), PROMPT, 3, 60, **kv)
    assert [t for t, *_ in got] == [t for t, _ in expected]
    assert np.abs(got[0][1] - expected[0][1]).max() <= 1e-4


def test_prompt_lookup_drafts_from_a_prompt_that_repeats_itself(models):
    target = models[0]
    prompt = PROMPT + PROMPT + PROMPT[:5]
    expected = target_alone(target, prompt, 40)
    got = speculative(target, None, prompt, 4, 40)
    assert [t for t, *_ in got] == [t for t, _ in expected]
    assert sum(f for *_, f in got) > 0


def test_lookup_copies_what_followed_the_latest_longest_match():
    assert lookup([1, 2, 3, 9, 2, 3, 7, 8, 2, 3], 2) == [7, 8]
    assert lookup([5, 1, 6, 4, 1], 3) == [6, 4, 1]
    assert lookup([1, 2, 3], 3) == []


def test_stream_generate_says_which_tokens_came_from_the_draft(models):
    target, processor, near, _ = models
    plain = list(mlx_gemma3.stream_generate(target, processor, PROMPT, max_tokens=30))
    drafted = list(mlx_gemma3.stream_generate(target, processor, PROMPT, max_tokens=30, draft_model=near))
    assert [r.token for r in drafted] == [r.token for r in plain]
    assert any(r.from_draft for r in drafted) and not any(r.from_draft for r in plain)
    assert drafted[-1].finish_reason == "length" and drafted[-1].generation_tokens == 30


def test_repetition_penalty_and_processors_see_the_right_history(models):
    target, processor, near, _ = models
    seen = {}

    def ban_last(tokens, logits):  # depends on the exact history: a wrong one changes the output
        return logits.at[:, tokens[-1].item()].add(-1e9)

    options = dict(max_tokens=40, repetition_penalty=1.3, logits_processors=[ban_last])
    plain = [r.token for r in mlx_gemma3.stream_generate(target, processor, PROMPT, **options)]
    for name, extra in {"draft": dict(draft_model=near), "lookup": dict(prompt_lookup=3)}.items():
        seen[name] = [r.token for r in mlx_gemma3.stream_generate(target, processor, PROMPT, **options, **extra)]
    assert seen == {"draft": plain, "lookup": plain}


def test_closing_the_generator_leaves_the_caches_after_the_last_token(models):
    target, _, near, _ = models
    cache, draft_cache = target.make_cache(rewind=4), near.make_cache(rewind=4)
    steps = speculative_generate_step(target, near, PROMPT, cache, draft_cache, num_draft_tokens=3)
    got = [next(steps)[0] for _ in range(5)]
    steps.close()
    assert cache[0].offset == len(PROMPT) + 5 - 1 and draft_cache[0].offset <= cache[0].offset
    rest = list(mlx_gemma3.generate_step(target, [got[-1]], cache, history=PROMPT + got[:-1], max_tokens=10))
    assert got + [t for t, _ in rest] == [t for t, _ in target_alone(target, PROMPT, 15)]


def test_a_cache_that_cannot_rewind_the_drafts_is_one_clear_error(models):
    target, _, _, other = models
    steps = speculative_generate_step(target, other, PROMPT, target.make_cache(rewind=1), num_draft_tokens=4)
    with pytest.raises(mlx_gemma3.Gemma3Error, match="rewind=num_draft_tokens"):
        list(zip(range(40), steps))


def test_a_draft_of_another_vocabulary_is_refused(models, tmp_path):
    target, processor, _, _ = models
    small, _, _ = converted(tmp_path, 2, vocab_size=16)
    with pytest.raises(mlx_gemma3.Gemma3Error, match="vocabulary"):
        mlx_gemma3.generate(target, processor, PROMPT, max_tokens=3, draft_model=small)
    with pytest.raises(mlx_gemma3.Gemma3Error, match="one of them"):
        mlx_gemma3.generate(target, processor, PROMPT, draft_model=small, prompt_lookup=2)


@pytest.mark.slow
def test_bounded_max_kv_size_gives_the_targets_own_tokens(models):
    target, processor, near, _ = models
    options = dict(max_tokens=60, max_kv_size=12)
    plain = [r.token for r in mlx_gemma3.stream_generate(target, processor, PROMPT, **options)]
    drafted = [r.token for r in mlx_gemma3.stream_generate(target, processor, PROMPT, **options, draft_model=near)]
    looked = [r.token for r in mlx_gemma3.stream_generate(target, processor, PROMPT, **options, prompt_lookup=3)]
    assert drafted == plain and looked == plain


# Sampling: the first two tokens' joint distribution, drawn through the acceptance rule, against the target's.

RUNS = 4000
VOCAB = 16


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    target, _, _ = converted(tmp_path_factory.mktemp("small_target"), 5, vocab_size=VOCAB)
    draft, _, _ = converted(tmp_path_factory.mktemp("small_draft"), 6, vocab_size=VOCAB)
    return target, draft


def sampling_probs(model, sampler: Sampler, prompt: list[int]) -> np.ndarray:
    """[V] the target-only sampler's exact next-token distribution, and [V, V] the one after each token."""
    first = model(mx.array([prompt]))[0, -1:]
    after = model(mx.array([[*prompt, t] for t in range(VOCAB)]))[:, -1]
    probs = [
        mx.softmax(sampler.filter(logits - mx.logsumexp(logits, -1, keepdims=True)), -1) for logits in (first, after)
    ]
    return np.array(probs[0][0], dtype=np.float64), np.array(probs[1], dtype=np.float64)


def chi_square(counts: np.ndarray, expected_probs: np.ndarray) -> tuple[float, int]:
    expected = expected_probs * counts.sum()
    assert counts[expected == 0].sum() == 0, "a token the target can never sample came out"
    kept = expected > 0
    return float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum()), int(kept.sum()) - 1


def draw(probs: np.ndarray, key) -> mx.array:
    return mx.random.categorical(mx.log(mx.array(probs.astype(np.float32))), key=key)


def first_two_tokens(p1, p2, q1, q2, key, point_masses: bool) -> np.ndarray:
    """RUNS samples of the first two tokens: a round of 2 drafts, then (where none stood) a round of 1."""
    keys = mx.random.split(key, 6)
    if point_masses:  # prompt lookup: the drafts are fixed
        d1, d2 = mx.full((RUNS,), 3), mx.full((RUNS,), 7)
    else:
        d1 = draw(np.broadcast_to(q1, (RUNS, VOCAB)), keys[0])
        d2 = draw(q2[np.array(d1)], keys[1])
    probs = mx.array(np.stack([np.broadcast_to(p1, (RUNS, VOCAB)), p2[np.array(d1)], p2[np.array(d1)]], 1))
    q = (
        None
        if point_masses
        else mx.array(np.stack([np.broadcast_to(q1, (RUNS, VOCAB)), q2[np.array(d1)]], 1).astype(np.float32))
    )
    accepted, token = accept_sampled(mx.stack([d1, d2], 1), probs.astype(mx.float32), q, keys[2])
    accepted, token, d1, d2 = map(np.array, (accepted, token, d1, d2))
    first = np.where(accepted >= 1, d1, token)
    second = np.where(accepted >= 2, d2, token)
    redo = accepted == 0  # the first token was resampled: its successor comes from a new round of one draft
    d1b = np.full(RUNS, 3) if point_masses else np.array(draw(q2[first], keys[3]))
    probs_b = mx.array(np.stack([p2[first], p2[first]], 1).astype(np.float32))
    q_b = None if point_masses else mx.array(np.stack([q2[first]], 1).astype(np.float32))
    accepted_b, token_b = map(np.array, accept_sampled(mx.array(d1b[:, None]), probs_b, q_b, keys[4]))
    second = np.where(redo, np.where(accepted_b >= 1, d1b, token_b), second)
    return first * VOCAB + second


@pytest.mark.parametrize("drafting", ["draft model", "prompt lookup"])
@pytest.mark.parametrize("filters", [dict(top_k=5), dict(top_p=0.8)])
def test_speculative_sampling_follows_the_targets_distribution(small_models, drafting, filters):
    target, draft = small_models
    sampler = Sampler(temp=1.0, **filters)
    prompt = random_ids(6, vocab=VOCAB, seed=4)[0].tolist()
    p1, p2 = sampling_probs(target, sampler, prompt)
    q1, q2 = sampling_probs(draft, sampler, prompt)
    pairs = first_two_tokens(p1, p2, q1, q2, mx.random.key(11), drafting == "prompt lookup")
    counts = np.bincount(pairs, minlength=VOCAB * VOCAB).astype(np.float64)
    statistic, dof = chi_square(counts, (p1[:, None] * p2).reshape(-1))
    assert statistic < dof + 8 * math.sqrt(2 * dof)  # about 8 standard deviations: a wrong rule fails by far more
    assert np.abs(counts.reshape(VOCAB, VOCAB).sum(1) / RUNS - p1).max() < 0.05


def test_sampling_through_the_generator_runs_and_is_reproducible(small_models):
    target, draft = small_models
    prompt = random_ids(6, vocab=VOCAB, seed=4)[0].tolist()

    def run(seed):
        steps = speculative_generate_step(
            target,
            draft,
            prompt,
            target.make_cache(rewind=4),
            num_draft_tokens=3,
            sampler=Sampler(temp=1.0, top_k=5, seed=seed),
            max_tokens=30,
        )
        return [token for token, _, _ in steps]

    assert run(1) == run(1) and len(run(2)) == 30


@pytest.mark.slow
def test_a_multimodal_target_with_a_text_only_draft_gives_its_own_tokens(models, tmp_path):
    from conftest import TINY_IMAGE_TOKENS, tiny_multimodal_model
    from test_vision import pixels, prompt_with_images

    hf = tiny_multimodal_model(seed=4, image_tokens=TINY_IMAGE_TOKENS, sliding_window=8)
    with reference_torch().no_grad():
        hf.model.language_model.embed_tokens.weight.mul_(0.1)
    hf.save_pretrained(tmp_path / "hf")
    target, _ = mlx_gemma3.load(convert(tmp_path / "hf", tmp_path / "mlx"))
    prompt = prompt_with_images([20, "image", 25], 4)[0].tolist()
    features = target.encode_images(mx.array(pixels(1)))
    plain = [
        t
        for t, _ in mlx_gemma3.generate_step(
            target, prompt, target.make_cache(), image_features=features, max_tokens=60
        )
    ]
    for draft in (models[3], None):
        steps = speculative_generate_step(
            target,
            draft,
            prompt,
            target.make_cache(rewind=4),
            num_draft_tokens=3,
            image_features=features,
            max_tokens=60,
            prefill_step_size=16,
        )
        got = list(steps)
        assert [t for t, _, _ in got] == plain
        assert draft is None or 0 < sum(f for *_, f in got) < 45  # drafts accepted and rejected


@pytest.mark.slow
def test_chat_across_turns_with_a_draft_is_the_chat_without(tiny_chat_model, tmp_path):
    folder, _, reference = tiny_chat_model
    model, processor = mlx_gemma3.load(folder)
    draft, _, _ = converted(tmp_path, 2, noise_from=reference, sliding_window=16, head_dim=16, query_pre_attn_scalar=16)

    def conversation(**options):
        chat = mlx_gemma3.Chat(model, processor, max_tokens=24, repetition_penalty=1.2, **options)
        stream = chat.stream("Tell me a long story.")
        stopped = [next(stream) for _ in range(5)]
        stream.close()
        turns = [list(chat.stream(text)) for text in ("Go on.", "And then?")]
        responses = stopped + [r for turn in turns for r in turn]
        return (
            [r.token for r in stopped],
            [[r.token for r in turn] for turn in turns],
            sum(r.from_draft for r in responses),
        )

    *plain, _ = conversation()
    assert min(map(len, plain[1])) > 1
    *drafted, from_draft = conversation(draft_model=draft, num_draft_tokens=3)
    assert drafted == plain and from_draft > 0
    *looked_up, _ = conversation(prompt_lookup=4)
    assert looked_up == plain


@pytest.mark.slow
def test_generate_and_chat_command_lines_take_the_speculative_flags(tiny_chat_model, capsys, monkeypatch):
    import io

    monkeypatch.setattr(mlx_gemma3, "generate", mlx_gemma3.generate)  # importing the command shadows the function
    from mlx_gemma3.chat import main as chat_main
    from mlx_gemma3.generate import main as generate_main

    folder = str(tiny_chat_model[0])
    common = ["--model", folder, "--prompt", "Tell me a story.", "--max-tokens", "12", "--temp", "0"]
    outputs, errors = [], []
    for flags in ([], ["--draft-model", folder, "--num-draft-tokens", "2"], ["--prompt-lookup", "3"]):
        assert generate_main([*common, *flags]) == 0
        out, err = capsys.readouterr()
        outputs.append(out)
        errors.append(err)
    assert outputs[1] == outputs[0] == outputs[2]
    assert "Accepted draft tokens" not in errors[0]
    assert "Accepted draft tokens: 8 of 12 generated (66.7%)" in errors[1]  # the model as its own draft: rounds of 3
    assert "Accepted draft tokens: " in errors[2]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert chat_main(["--model", folder, "--max-tokens", "8", "--draft-model", folder, "--num-draft-tokens", "2"]) == 0
    assert generate_main([*common, "--prompt-lookup", "2", "--draft-model", folder]) == 1
    assert "pass one of them" in capsys.readouterr().err

"""Speculative decoding: a draft model or prompt lookup proposes tokens, the target checks them in one forward."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx

from ..errors import Gemma3Error
from .constrain import Constraint
from .sample import Sampler
from .step import PREFILL_STEP_SIZE, LogitsProcessor, Progress, prefill, prompt_token_ids
from .thread_streams import generation_stream

__all__ = ["speculative_generate_step"]

LOOKUP_NGRAM = 3  # prompt lookup matches the longest suffix of 3, 2 or 1 tokens


def speculative_generate_step(
    model,
    draft_model,
    prompt_ids: Sequence[int],
    cache,
    draft_cache=None,
    *,
    num_draft_tokens: int = 3,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    prefill_step_size: int = PREFILL_STEP_SIZE,
    image_features: mx.array | None = None,
    history: Sequence[int] = (),
    max_tokens: int | None = None,
    progress: Progress | None = None,
) -> Iterator[tuple[int, mx.array, bool]]:
    """Yield (token, log-probabilities [V], from_draft) per generated token, as `generate_step` does.

    Each round `draft_model` (or, when it is None, prompt lookup over the prompt and what came since) proposes
    up to `num_draft_tokens` tokens; the target scores them all in one forward and keeps those its own sampler
    would have produced (greedy: equal to its argmax; sampling: accepted with probability min(1, p/q), a
    rejected one resampled from max(0, p − q)), so the tokens follow the target's distribution exactly.
    Both caches are trimmed back after a rejection: make them with `rewind=num_draft_tokens + 1`.
    `draft_cache` may hold a prefix of `history` (or nothing); it catches up first. Close the generator to stop."""
    prompt_ids = prompt_token_ids(prompt_ids, "speculative_generate_step")
    if not (isinstance(num_draft_tokens, int) and num_draft_tokens >= 1):
        raise Gemma3Error(f"num_draft_tokens must be a positive integer, got {num_draft_tokens!r}")
    if sampler is not None and not isinstance(sampler, Sampler):
        raise Gemma3Error("speculative decoding needs the target's distribution: pass a Sampler (or None: greedy)")
    tokens = [*history, *prompt_ids]
    with mx.stream(generation_stream()):
        if draft_model is None:
            drafter = PromptLookup(model)
        else:
            check_vocabularies(model, draft_model)
            if draft_cache is None:
                draft_cache = draft_model.make_cache(rewind=num_draft_tokens + 1)
            drafter = DraftModel(model, draft_model, draft_cache, sampler, tuple(logits_processors))
        target = Target(model, cache, sampler, tuple(logits_processors))
        start = len(history)
        prefill(model, tokens[start:-1], cache, prefill_step_size, image_features, progress)
        drafter.catch_up(tokens, prefill_step_size)
        yield from speculative_decode(target, drafter, tokens, num_draft_tokens, max_tokens)


def speculative_decode(target, drafter, tokens: list[int], num_draft_tokens: int, max_tokens: int | None):
    """Rounds of draft, verify, rewind; `tokens` (everything so far) grows as tokens are handed out."""
    made = 0
    try:
        while max_tokens is None or made < max_tokens:
            room = num_draft_tokens if max_tokens is None else min(num_draft_tokens, max_tokens - made - 1)
            drafts, draft_probs = admissible_drafts(target.processors, tokens, *drafter.propose(tokens, room))
            logprobs = target.score(tokens, drafts)
            accepted, token = target.accept(drafts, logprobs, draft_probs)
            for model in (target, drafter):
                model.keep(len(tokens) + accepted)
            for i, new_token in enumerate([*drafts[:accepted], token]):
                tokens.append(new_token)
                made += 1
                yield new_token, logprobs[i], i < accepted
                if max_tokens is not None and made >= max_tokens:
                    return
    finally:  # stopped inside a round: the caches hold all but the last token handed out, as generate_step's
        for model in (target, drafter):
            model.keep(len(tokens) - 1)


class Target:
    """The model whose distribution decides: scores a round's drafts and accepts or replaces them."""

    def __init__(self, model, cache, sampler: Sampler | None, processors: tuple):
        self.model, self.cache, self.sampler, self.processors = model, cache, sampler, processors

    def score(self, tokens: list[int], drafts: list[int]) -> mx.array:
        """Processed log-probabilities [len(drafts) + 1, V] after the last token and after each draft."""
        logits = self.model(mx.array([tokens[-1], *drafts])[None], cache=self.cache)[0]
        return processed_logprobs(logits, self.processors, tokens, drafts)

    def accept(self, drafts: list[int], logprobs: mx.array, draft_probs: mx.array | None) -> tuple[int, int]:
        """How many drafts stand, and the token that follows them."""
        drafts_array = mx.array(drafts, dtype=mx.int32).reshape(1, len(drafts))
        if greedy(self.sampler):
            accepted, token = accept_greedy(drafts_array, logprobs[None])
        else:
            probs = mx.softmax(self.sampler.filter(logprobs), axis=-1)
            self.sampler.key, key = mx.random.split(self.sampler.key)
            q = None if draft_probs is None else draft_probs[None]
            accepted, token = accept_sampled(drafts_array, probs[None], q, key)
        return accepted.item(), token.item()

    def keep(self, length: int) -> None:
        """Forget the rejected drafts: the cache then holds at most the first `length` tokens."""
        rewind(self.cache, self.cache[0].offset - length)


class DraftModel:
    """A smaller model of the same vocabulary that drafts token by token from its own cache."""

    def __init__(self, target, model, cache, sampler: Sampler | None, processors: tuple):
        self.model, self.cache, self.sampler, self.processors = model, cache, sampler, processors
        self.vocab_size = target.config.text.vocab_size
        vision = target.config.vision
        self.image_token = vision.image_token_id if vision is not None else None

    def readable(self, ids: list[int]) -> list[int]:
        """Ids the draft can embed: image placeholders (which it cannot see, and may lie past its vocabulary) as 0."""
        limit = self.model.config.text.vocab_size
        return [0 if token == self.image_token or token >= limit else token for token in ids]

    def catch_up(self, tokens: list[int], step: int) -> None:
        """Feed what the draft cache lacks of `tokens`, all but the last."""
        self.keep(len(tokens) - 1)
        prefill(self.model, self.readable(tokens[self.cache[0].offset : -1]), self.cache, step)

    def propose(self, tokens: list[int], count: int) -> tuple[list[int], mx.array | None]:
        """Up to `count` drafts and, when sampling, the distributions they were drawn from [count, V]."""
        drafts, probs = [], []
        feed = tokens[self.cache[0].offset :]
        for _ in range(count):
            logits = self.model(mx.array(self.readable(feed))[None], cache=self.cache)[0, -1:]
            logprobs = processed_logprobs(self.in_target_vocabulary(logits), self.processors, tokens, drafts)
            token, q = self.draw(logprobs)
            drafts.append(token)
            probs.append(q)
            feed = [token]
        return drafts, None if greedy(self.sampler) or not drafts else mx.concatenate(probs)

    def in_target_vocabulary(self, logits: mx.array) -> mx.array:
        """[1, target V]: ids past the draft's vocabulary and the image placeholder never drafted."""
        extra = self.vocab_size - logits.shape[-1]
        if extra > 0:
            logits = mx.concatenate([logits, mx.full((1, extra), -mx.inf, dtype=logits.dtype)], axis=-1)
        if self.image_token is not None and self.image_token < self.vocab_size:
            logits[:, self.image_token] = -mx.inf
        return logits

    def draw(self, logprobs: mx.array) -> tuple[int, mx.array | None]:
        if greedy(self.sampler):
            return mx.argmax(logprobs, axis=-1).item(), None
        filtered = self.sampler.filter(logprobs)
        self.sampler.key, key = mx.random.split(self.sampler.key)
        token = mx.random.categorical(filtered, key=key)
        return token.item(), mx.softmax(filtered, axis=-1)

    def keep(self, length: int) -> None:
        """Forget the drafts the target rejected: the cache then holds at most the first `length` tokens."""
        rewind(self.cache, self.cache[0].offset - length)


class PromptLookup:
    """Drafts by copying: what followed the latest earlier occurrence of the last few tokens."""

    def __init__(self, target):
        vision = target.config.vision
        self.image_token = vision.image_token_id if vision is not None else None

    def catch_up(self, tokens: list[int], step: int) -> None:
        pass

    def propose(self, tokens: list[int], count: int) -> tuple[list[int], None]:
        drafts = lookup(tokens, count) if count else []
        if self.image_token in drafts:
            drafts = drafts[: drafts.index(self.image_token)]
        return drafts, None  # a point mass on each draft

    def keep(self, length: int) -> None:
        pass


def lookup(tokens: list[int], count: int, longest: int = LOOKUP_NGRAM) -> list[int]:
    """Up to `count` tokens that followed the latest earlier match of the longest suffix (of `longest`…1 tokens)."""
    for size in range(min(longest, len(tokens) - 1), 0, -1):
        suffix = tokens[-size:]
        for start in range(len(tokens) - size - 1, -1, -1):
            if tokens[start : start + size] == suffix:
                return tokens[start + size : start + size + count]
    return []


def admissible_drafts(processors: tuple, tokens: list[int], drafts: list[int], draft_probs: mx.array | None):
    """The drafts (and their distributions) up to the first one a constraint among the processors refuses."""
    kept = min((p.admissible(tokens, drafts) for p in processors if isinstance(p, Constraint)), default=len(drafts))
    if kept == len(drafts):
        return drafts, draft_probs
    return drafts[:kept], None if draft_probs is None or kept == 0 else draft_probs[:kept]


def processed_logprobs(logits: mx.array, processors: tuple, tokens: list[int], drafts: list[int]) -> mx.array:
    """Row i of `logits` [N, V] (the last N positions) through the processors, which see `tokens` + drafts[:i]."""
    rows = []
    first = len(drafts) + 1 - logits.shape[0]
    for i in range(logits.shape[0]):
        row = logits[i : i + 1]
        if processors:
            seen = mx.array([*tokens, *drafts[: first + i]])
            for processor in processors:
                row = processor(seen, row)
        rows.append(row)
    logits = mx.concatenate(rows).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def greedy(sampler: Sampler | None) -> bool:
    return sampler is None or sampler.temp == 0


def accept_greedy(drafts: mx.array, logprobs: mx.array) -> tuple[mx.array, mx.array]:
    """Per row of drafts [B, k] against target log-probabilities [B, k+1, V]: the count of leading drafts equal
    to the target's argmax [B], and the target's argmax after them [B]."""
    best = mx.argmax(logprobs, axis=-1)
    accepted = mx.cumprod(drafts == best[:, :-1], axis=-1).sum(axis=-1)
    return accepted, mx.take_along_axis(best, accepted[:, None], axis=-1)[:, 0]


def accept_sampled(drafts: mx.array, probs: mx.array, draft_probs: mx.array | None, key) -> tuple[mx.array, mx.array]:
    """Speculative sampling per row: drafts [B, k] drawn from `draft_probs` [B, k, V] (None: point masses) against
    the target's sampling probabilities [B, k+1, V]. Draft i stands with probability min(1, p/q) if all before it
    stood; the next token is drawn from max(0, p − q), normalised, at the first rejection (from p after them all).
    Returns (accepted [B], next token [B])."""
    batch, k = drafts.shape
    if draft_probs is None:
        draft_probs = (mx.arange(probs.shape[-1]) == drafts[..., None]).astype(probs.dtype)
    uniform_key, token_key = mx.random.split(key)
    p = mx.take_along_axis(probs[:, :k], drafts[..., None], axis=-1)[..., 0]
    q = mx.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    stands = mx.random.uniform(shape=(batch, k), key=uniform_key) * q < p
    accepted = mx.cumprod(stands, axis=-1).sum(axis=-1)
    padded = mx.concatenate([draft_probs, mx.zeros_like(probs[:, :1])], axis=1)
    at = accepted[:, None, None]
    target = mx.take_along_axis(probs, at, axis=1)[:, 0]
    residual = mx.maximum(target - mx.take_along_axis(padded, at, axis=1)[:, 0], 0)
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, target)
    return accepted, mx.random.categorical(mx.log(residual), key=token_key)


def rewind(cache, n: int) -> None:
    """Forget the last `n` tokens of every layer, or one clear error when a layer cannot."""
    if n <= 0:
        return
    if not all(layer.is_trimmable(n) for layer in cache):
        raise Gemma3Error(
            f"the cache cannot forget its last {n} tokens: make it with model.make_cache(rewind=num_draft_tokens + 1)"
        )
    for layer in cache:
        layer.trim(n)


def check_vocabularies(model, draft_model) -> None:
    """The draft must share the target's vocabulary (a multimodal target may add image placeholders past it)."""
    target, draft = model.config.text.vocab_size, draft_model.config.text.vocab_size
    vision = model.config.vision
    extra_ok = vision is not None and draft < target and draft >= vision.image_token_id
    if draft != target and not extra_ok:
        raise Gemma3Error(
            f"the draft model's vocabulary ({draft} tokens) is not the target's ({target}): "
            "pick a draft from the same model family"
        )

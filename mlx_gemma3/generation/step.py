"""The step loop: chunked prefill, then one token per step with the next step queued while the caller works."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx

from ..errors import Gemma3Error
from ..processing.prompt import as_token_ids
from .thread_streams import generation_stream

__all__ = ["generate_step"]

Sampler = Callable[[mx.array], mx.array]  # log-probabilities [1, V] → token [1]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # (tokens so far [N], logits [1, V]) → logits [1, V]
# (prompt tokens in the cache so far, prompt tokens in all): after each prefill chunk, and (total, total) once
# prefill is over, when the cache holds all but the last prompt token (the first step feeds that one). `total`
# is the prompt length the statistics report (GenerationResponse.prompt_tokens).
Progress = Callable[[int, int], None]
PREFILL_STEP_SIZE = 512


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def generate_step(
    model,
    prompt_ids: Sequence[int] | mx.array,
    cache,
    *,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    prefill_step_size: int = PREFILL_STEP_SIZE,
    image_features: mx.array | None = None,
    history: Sequence[int] = (),
    max_tokens: int | None = None,
    progress: Progress | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, log-probabilities [V]) per generated token, forever or for `max_tokens` steps.

    `cache` (from `model.make_cache()`) holds what came before `prompt_ids`; `history` names those tokens
    so that logits processors see the whole sequence. `logprobs` are the log-softmax of the processed
    logits. Step n+1 is queued (`mx.async_eval`) before step n is handed out; close the generator to stop.
    `prompt_ids`: a list of ints, or a 1-D (or [1, N]) integer mx.array or numpy array.
    `progress(done, total)` is called after each prefill chunk (see `Progress`). Runs on this thread's generation
    stream."""
    prompt_ids = prompt_token_ids(prompt_ids, "generate_step")
    if prefill_step_size < 1:
        raise Gemma3Error(f"prefill_step_size must be at least 1, got {prefill_step_size}")
    stream = generation_stream()
    with mx.stream(stream):
        try:
            yield from _steps(
                model,
                prompt_ids,
                cache,
                sampler or greedy,
                tuple(logits_processors),
                prefill_step_size,
                image_features,
                list(history),
                max_tokens,
                progress,
            )
        finally:
            mx.synchronize(stream)  # a step queued ahead must finish before anyone frees what it uses


def prompt_token_ids(prompt, caller: str) -> list[int]:
    """A step loop's prompt as a list of ids, or one error that says which types it takes."""
    ids = as_token_ids(prompt)
    if ids is None:
        what = type(prompt).__name__
        if hasattr(prompt, "shape") and hasattr(prompt, "dtype"):
            what += f" of shape {list(prompt.shape)} and type {prompt.dtype}"
        raise Gemma3Error(
            f"{caller} takes the prompt as token ids: a list of ints, or a 1-D (or [1, N]) integer mx.array or "
            f"numpy array; got {what} (text goes through stream_generate or the tokenizer)"
        )
    if not ids:
        raise Gemma3Error(f"{caller} needs at least one prompt token")
    return ids


def _steps(model, ids, cache, sampler, processors, prefill_step_size, features, history, max_tokens, progress):
    prefill(model, ids[:-1], cache, prefill_step_size, features, progress)
    seen = mx.array(history + ids) if processors else None
    token, logprobs = decode_one_token(model, mx.array(ids[-1:]), cache, sampler, processors, seen)
    n = 0
    while max_tokens is None or n < max_tokens:
        n += 1
        if max_tokens is None or n < max_tokens:
            if processors:
                seen = mx.concatenate([seen, token])
            next_token, next_logprobs = decode_one_token(model, token, cache, sampler, processors, seen)
        yield token.item(), logprobs[0]
        if max_tokens is None or n < max_tokens:
            token, logprobs = next_token, next_logprobs


def decode_one_token(model, token: mx.array, cache, sampler: Sampler, processors, seen) -> tuple[mx.array, mx.array]:
    """Queue one step for `token` [1]: (sampled token [1], log-probabilities [1, V]), evaluated asynchronously."""
    logits = model(token[None], cache=cache)[:, -1]
    for processor in processors:
        logits = processor(seen, logits)
    logits = logits.astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    next_token = sampler(logprobs)
    mx.async_eval(next_token, logprobs)
    return next_token, logprobs


def prefill(model, ids: list[int], cache, step: int, features=None, progress: Progress | None = None) -> None:
    """Feed `ids`, a prompt but its last token (the first step feeds that one), in chunks of about `step` tokens
    (a chunk never splits an image), evaluating each chunk's keys and values before the next. `progress` counts
    the whole prompt: (done, len(ids) + 1) after each chunk but the last, then (total, total)."""
    total = len(ids) + 1
    runs = image_runs(ids, model.config.vision.image_token_id) if features is not None else []
    if features is not None and len(runs) != features.shape[0]:
        raise Gemma3Error(f"the prompt has {len(runs)} image(s) but {features.shape[0]} were encoded")
    start = 0
    while start < len(ids):
        end = chunk_end(start, min(start + step, len(ids)), runs)
        inside = [i for i, (first, _) in enumerate(runs) if start <= first < end]
        chunk = mx.array(ids[start:end])[None]
        if inside:
            model(chunk, cache=cache, image_features=features[inside[0] : inside[-1] + 1])
        else:
            model(chunk, cache=cache)
        mx.eval([layer.state for layer in cache])
        start = end
        if progress is not None:
            progress(end if end < len(ids) else total, total)


def chunk_end(start: int, end: int, runs: list[tuple[int, int]]) -> int:
    """`end`, moved so that the chunk start…end does not cut an image run in two."""
    for first, last in runs:
        if first < end < last:
            end = first if first > start else last
    return end


def image_runs(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """(first, one past last) position of each run of image tokens."""
    runs, first = [], None
    for i, token in enumerate([*ids, None]):
        if token == image_token_id and first is None:
            first = i
        elif token != image_token_id and first is not None:
            runs.append((first, i))
            first = None
    return runs

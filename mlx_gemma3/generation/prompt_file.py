"""stream_generate's `prompt_cache_file`: a prompt's KV cache kept in a file and reused by prompts that start with it.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import Gemma3Error
from ..model.cache import load_prompt_cache, same_layers, save_prompt_cache


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable_cache(path: Path, ids: list[int], new_cache) -> tuple[list, list[int]]:
    """(cache, the tokens it holds): the file's cache when its tokens begin `ids` (and leave at least the last
    prompt token to feed), else `new_cache()` holding nothing."""
    if not path.is_file():
        return new_cache(), []
    cache, held, _ = load_prompt_cache(path)
    if not same_layers(cache, new_cache()):
        raise Gemma3Error(f"prompt cache {path} was saved from a different model: delete it or pass another file")
    if len(held) < len(ids) and ids[: len(held)] == held:
        return cache, held
    return new_cache(), []


def saving_when_prefilled(path: Path, cache, prompt_ids: list[int], progress):
    """A prefill progress callback that also writes the cache to `path` once the prompt (all but its last
    token, which generation feeds) is in it."""

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        if done == total:
            save_prompt_cache(path, cache, prompt_ids[:-1])

    return report

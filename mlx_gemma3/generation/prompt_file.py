"""stream_generate's `prompt_cache_file`: a prompt's KV cache kept in a file and reused by prompts that start with it.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from pathlib import Path

from ..errors import Gemma3Error
from ..model.cache import load_prompt_cache, same_layers, save_prompt_cache
from .prefix_reuse import reusable, trimmed, when_prefilled
from .step import Progress


def reusable_cache(path: Path, ids: list[int], new_cache) -> tuple[list, list[int]]:
    """(cache, the tokens it holds): the file's cache trimmed back to what it shares with `ids` (leaving at least
    the last prompt token to feed) when it can be, else `new_cache()` holding nothing."""
    if not path.is_file():
        return new_cache(), []
    cache, held, _ = load_prompt_cache(path)
    if not same_layers(cache, new_cache()):
        raise Gemma3Error(f"prompt cache {path} was saved from a different model: delete it or pass another file")
    n = reusable(cache, held, ids)
    return trimmed(cache, held, n) if n else (new_cache(), [])


def saving_when_prefilled(path: Path, cache, prompt_ids: list[int], progress: Progress | None) -> Progress:
    """A prefill progress callback that also writes the cache to `path` once the prompt (all but its last
    token, which generation feeds) is in it."""
    return when_prefilled(progress, lambda: save_prompt_cache(path, cache, prompt_ids[:-1]))

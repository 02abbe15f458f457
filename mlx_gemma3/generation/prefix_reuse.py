"""Reusing a KV cache for a prompt that begins the way the cache's tokens do — Chat's next turn, the server's prompt
cache, a prompt-cache file — written once: how much of the prompt a cache serves exactly, trimming it back to
that, and which tokens a cache holds after a generation.

Prompts are compared as keys: the token ids, with every token of an image replaced by a key made from the image's
content hash (a negative number, never a token id). The same image in the next turn is reused; a different image
at the same place is not, though both have the same ids.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from .step import Progress, image_runs


def common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading items `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def image_digests(pixels: np.ndarray | None) -> list[str]:
    """Each image's content hash (sha256 of its preprocessed pixels)."""
    return [] if pixels is None else [hashlib.sha256(image.tobytes()).hexdigest() for image in pixels]


def prompt_keys(ids: Sequence[int], image_token_id: int | None, digests: Sequence[str] = ()) -> list[int]:
    """`ids` with the tokens of the i-th run of image tokens replaced by the key of digests[i]."""
    if not digests:
        return list(ids)
    keys = list(ids)
    for (first, last), digest in zip(image_runs(ids, image_token_id), digests, strict=True):
        keys[first:last] = [-1 - int(digest[:15], 16)] * (last - first)
    return keys


def token_ids(keys: Sequence[int], image_token_id: int | None) -> list[int]:
    """The token ids behind `keys` (an image's key back to the image token)."""
    return [image_token_id if key < 0 else key for key in keys]


def outside_images(keys: Sequence[int], n: int) -> int:
    """`n`, moved back to the start of the image it would end inside (an image is prefilled whole)."""
    while 0 < n < len(keys) and keys[n - 1] < 0 and keys[n] == keys[n - 1]:
        n -= 1
    return n


def reusable(cache: list, held: Sequence[int], keys: Sequence[int]) -> int:
    """How many of `keys` a cache holding `held` serves exactly: their common prefix, leaving at least the last
    key to feed and never ending inside an image, if every layer can be trimmed back to it (a sliding-window ring
    forgets only a few tokens once it has wrapped); else 0."""
    n = outside_images(keys, min(common_prefix(held, keys), len(keys) - 1))
    if n <= 0 or not all(layer.is_trimmable(len(held) - n) for layer in cache):
        return 0
    return n


def trimmed(cache: list, held: Sequence[int], n: int) -> tuple[list, list[int]]:
    """The cache trimmed back to its first `n` tokens (reusable said it can be), and their keys."""
    for layer in cache:
        layer.trim(len(held) - n)
    return cache, list(held[:n])


def held_keys(cache: list, keys: Sequence[int]) -> list[int] | None:
    """The keys a cache holds after generating (it leaves the last token or two unfed): the first `offset` of
    `keys` (the prompt's and the reply's); None when its layers disagree or hold more than `keys` says."""
    offsets = {layer.offset for layer in cache}
    if len(offsets) != 1 or not isinstance(offset := offsets.pop(), int) or offset > len(keys):
        return None
    return list(keys[:offset])


def when_prefilled(progress: Progress | None, action: Callable[[], None]) -> Progress:
    """A prefill progress callback that also runs `action()` once the whole prompt is in the cache."""

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        if done == total:
            action()

    return report

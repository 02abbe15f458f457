"""The server's prompt cache across requests: KV caches kept by the token ids they hold, reused by longest prefix.

An entry holds the cache a request ended with (its prompt and all but the last generated tokens) and a
checkpoint: a copy taken when the prompt was prefilled. A new request starts from the candidate (an entry's
cache or its checkpoint) sharing the longest prefix with it that the candidate can be trimmed back to
exactly (`is_trimmable` on every layer: a sliding-window ring rewinds only a few tokens once it wrapped),
so reuse never changes the logits. What a request uses is taken out of the store (the entry's other half
stays) and the request's own entry is put back after;
the least recently used go first when there are more than `max_entries` or more than `max_bytes`.


Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ..generation.prompt_file import common_prefix

DEFAULT_ENTRIES = 4
DEFAULT_BYTES = 2 * 2**30


@dataclass
class Entry:
    """A kept cache and the ids it holds; `checkpoint`: a copy holding `checkpoint_ids` (or None)."""

    layout: tuple
    ids: list[int]
    cache: list
    checkpoint: list | None = None
    checkpoint_ids: list[int] | None = None

    @property
    def nbytes(self) -> int:
        return cache_bytes(self.cache) + (cache_bytes(self.checkpoint) if self.checkpoint is not None else 0)


def cache_bytes(cache: list) -> int:
    return sum(layer.nbytes for layer in cache)


def reusable(cache: list, held: Sequence[int], ids: Sequence[int]) -> int:
    """How many of `ids` this cache (holding `held`) can serve exactly: the common prefix, leaving at least one
    token to feed, if every layer can be trimmed back to it; else 0."""
    n = min(common_prefix(held, ids), len(ids) - 1)
    if n <= 0 or not all(layer.is_trimmable(len(held) - n) for layer in cache):
        return 0
    return n


def best_candidate(entries, layout: tuple, ids: Sequence[int]) -> tuple[int, object, str | None]:
    """(tokens reused, the entry's key, "cache" or "checkpoint") of the best candidate; (0, None, None) if none."""
    best = (0, None, None)
    for key, entry in entries:
        if entry.layout != layout:
            continue
        for kind, cache, held in (
            ("cache", entry.cache, entry.ids),
            ("checkpoint", entry.checkpoint, entry.checkpoint_ids),
        ):
            if cache is not None and (n := reusable(cache, held, ids)) > best[0]:
                best = (n, key, kind)
    return best


def trimmed(cache: list, held: list[int], n: int) -> tuple[list, list[int]]:
    """The cache trimmed back to its first `n` tokens, and those tokens."""
    for layer in cache:
        layer.trim(len(held) - n)
    return cache, held[:n]


class PromptCacheStore:
    """At most `max_entries` entries of at most `max_bytes` together (0 for either: the store is off)."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES, max_bytes: int = DEFAULT_BYTES, evicts: bool = True):
        """`evicts` False: entries leave only through `keep` (a distributed follower keeps what rank 0 keeps)."""
        self.max_entries, self.max_bytes, self.evicts = max_entries, max_bytes, evicts
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.next_key = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def choose(self, layout: tuple, ids: Sequence[int]) -> tuple[int, object, str | None]:
        """What `take` would take: (tokens reused, entry key, "cache" or "checkpoint"), or (0, None, None)."""
        return best_candidate(self.entries.items(), layout, ids)

    def take(self, layout: tuple, ids: Sequence[int], choice: tuple | None = None) -> tuple[list | None, list[int]]:
        """(cache, the ids it holds: a prefix of `ids` shorter than it) taken out of the store, or (None, []);
        `choice`: what `choose` gave (on this store, or on the distributed leader's)."""
        n, key, kind = choice if choice is not None else self.choose(layout, ids)
        if key is None:
            return None, []
        entry = self.entries[key]
        if kind == "cache":
            taken, rest = (entry.cache, entry.ids), (entry.checkpoint, entry.checkpoint_ids)
        else:
            taken, rest = (entry.checkpoint, entry.checkpoint_ids), (entry.cache, entry.ids)
        if rest[0] is None:
            del self.entries[key]
        else:  # the other half stays where it was in the order (an earlier message may be edited later)
            self.entries[key] = Entry(entry.layout, rest[1], rest[0])
        return trimmed(*taken, n)

    def put(self, entry: Entry) -> None:
        """Keep `entry` as the most recently used, then evict down to the bounds (it too, if it alone is over)."""
        if not self.enabled or not entry.ids:
            return
        self.entries[self.next_key] = entry
        self.next_key += 1
        self.evict()

    def keep(self, keys) -> None:
        """Drop every entry but those of `keys`."""
        for key in [key for key in self.entries if key not in set(keys)]:
            del self.entries[key]

    def evict(self) -> None:
        while self.evicts and self.entries and (len(self.entries) > self.max_entries or self.nbytes > self.max_bytes):
            self.entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

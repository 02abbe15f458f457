"""Budget-aware closing: a short way to finish a grammar from where a reply is, in bytes and then in tokens.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import llguidance
import numpy as np

from ..processing.grammar import byte_tokenizer

# The order in which a finish tries bytes: closing quotes and brackets, then digits and letters, then other printable
# ASCII, then the rest (so a string closes, a number is one digit, a pattern gets its smallest characters).
ENDING_FIRST = [*b'"}]),', *b"0123456789", *b"abcdefghijklmnopqrstuvwxyz", *b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", *b" :.-_+"]
ENDING_FIRST += [b for b in range(0x20, 0x7F) if b not in ENDING_FIRST]
ENDING_FIRST += [b for b in range(256) if b not in ENDING_FIRST]
# A second search with digits first finds the shorter finish where a number is shorter than a string ({"id": 0}).
DIGITS_FIRST = [*b"0123456789", *(b for b in ENDING_FIRST if not 0x30 <= b <= 0x39)]
PREFERENCES = (np.array(ENDING_FIRST), np.array(DIGITS_FIRST))
ENDINGS = frozenset(b'"}]),')  # bytes that end a value: a byte after which one is allowed leads to a near end
SCAN = 64  # allowed bytes looked ahead at, at most, per byte of a finish
LONGEST_FINISH = 512  # bytes: a finish not found within this many counts as none


class Closer:
    """Knows, for one reply, a short sequence of tokens that finishes its grammar: it keeps a byte-level matcher at
    the reply's bytes, searches a finish byte by byte (finish_bytes) and turns the bytes into tokens that every
    matcher of the reply accepts. A finish is a real one (checked), and short, though not proven shortest."""

    def __init__(self, grammar: str, ll_tokenizer: llguidance.LLTokenizer, matchers: list[llguidance.LLMatcher]):
        self.bytes_matcher = llguidance.LLMatcher(byte_tokenizer(), grammar, log_level=0)
        self.ll_tokenizer, self.matchers = ll_tokenizer, matchers
        self.lengths: list[int] = []  # bytes of each token followed

    def follow(self, tokens: list[int]) -> None:
        for token in tokens:
            data = self.ll_tokenizer.decode_bytes([token])
            self.bytes_matcher.consume_tokens(list(data))
            self.lengths.append(len(data))

    def rollback(self, count: int) -> None:
        """Forget the last `count` tokens followed."""
        if count:
            self.bytes_matcher.rollback(sum(self.lengths[-count:]))
            del self.lengths[-count:]

    def finish(self, after: int | None = None) -> list[int] | None:
        """A short finish as tokens, from the reply (after `after`, when given: a candidate next token, weighed with
        the first PREFERENCES order only); None when none was found (or `after` is refused). Accepted by every
        matcher of the reply as they stand. Without `after`, the shorter of one search per PREFERENCES order."""
        start = self.bytes_matcher
        if after is not None:
            start, data = start.deep_copy(), list(self.ll_tokenizer.decode_bytes([after]))
            if start.validate_tokens(data) < len(data) or not start.consume_tokens(data):
                return None
        orders = PREFERENCES[:1] if after is not None else PREFERENCES
        found = [self.as_tokens(finish_bytes(start.deep_copy(), order), after) for order in orders]
        return min((tokens for tokens in found if tokens is not None), key=len, default=None)

    def as_tokens(self, found: bytes | None, after: int | None) -> list[int] | None:
        """`found` as tokens every matcher accepts after the reply (and `after`): as the tokenizer writes the text,
        else one token per byte; None when neither is accepted."""
        if found is None:
            return None
        prefix = [] if after is None else [after]
        accepted = lambda tokens: all(  # noqa: E731
            m.validate_tokens(prefix + tokens) == len(prefix) + len(tokens) for m in self.matchers
        )
        tokens = self.ll_tokenizer.tokenize_bytes(found)
        if accepted(tokens):
            return tokens
        tokens = [t for b in found for t in self.ll_tokenizer.tokenize_bytes(bytes([b]))]
        return tokens if accepted(tokens) else None


def allowed_bytes(matcher: llguidance.LLMatcher, order: np.ndarray) -> tuple[int, ...]:
    """The bytes the grammar allows next, in `order`."""
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return tuple(order[bits[order] == 1].tolist())


def landing(matcher: llguidance.LLMatcher, byte: int, order: np.ndarray) -> tuple[bool, tuple[int, ...], int]:
    """Where one byte leads: (accepting, the allowed bytes there, how many bytes the grammar forces on the way)."""
    after = matcher.deep_copy()
    after.consume_token(byte)
    forced = after.compute_ff_bytes()
    if forced:
        after.consume_tokens(list(forced))
    return after.is_accepting(), allowed_bytes(after, order), len(forced)


def finish_bytes(matcher: llguidance.LLMatcher, order: np.ndarray) -> bytes | None:
    """A short byte string that brings `matcher` (consumed) to an accepting state, or None. Greedy: the bytes the
    grammar forces; otherwise an allowed ending byte (ENDINGS) if there is one, else among the first SCAN allowed
    bytes in `order` one after which the grammar accepts or allows an ending byte (so "2" before "10"; see pick),
    else the first allowed. Where the allowed set repeats one met since the last ending byte (a loop such as a+b or
    (ab)*c), every allowed byte is looked at and, but for an ending byte, the one leading to the set met least
    often is taken."""
    out, visits = bytearray(), {}
    while len(out) <= LONGEST_FINISH:
        if matcher.is_accepting():
            return bytes(out)
        forced = matcher.compute_ff_bytes()
        if not forced:
            allowed = allowed_bytes(matcher, order)
            if not allowed:
                return None
            visits[allowed] = visits.get(allowed, 0) + 1
            looping = visits[allowed] > 1
            choice = least_visited(matcher, allowed, order, visits) if looping else pick(matcher, allowed, order)
            forced = bytes([choice])
        matcher.consume_tokens(list(forced))
        out += forced
        if ENDINGS.intersection(forced):
            visits.clear()  # a value ended: what repeats after it (the next item) is no loop
    return None


def pick(matcher: llguidance.LLMatcher, allowed: tuple[int, ...], order: np.ndarray) -> int:
    """The byte finish_bytes takes next (see there). Of the bytes that lead near an end, the one with the fewest
    bytes the grammar forces after it, counting one more where the grammar does not yet accept ("true" before
    "false", "0}" as soon as "1"); with none, the first that leads to another allowed set (the "@" of a+@)."""
    near, onward = None, None
    for byte in allowed[:SCAN]:
        if byte in ENDINGS:
            return byte if near is None else near[0]
        accepting, after, forced = landing(matcher, byte, order)
        cost = forced + (not accepting)
        if (accepting or ENDINGS.intersection(after)) and (near is None or cost < near[1]):
            near = (byte, cost)
        if onward is None and after != allowed:
            onward = byte
    if near is not None:
        return near[0]
    return allowed[0] if onward is None else onward


def least_visited(matcher: llguidance.LLMatcher, allowed: tuple[int, ...], order: np.ndarray, visits: dict) -> int:
    """In a loop: an ending byte, or one after which the grammar accepts, else the one leading to the allowed set
    met least often."""
    best = None
    for byte in allowed:
        if byte in ENDINGS:
            return byte
        accepting, after, _ = landing(matcher, byte, order)
        if accepting:
            return byte
        if best is None or visits.get(after, 0) < best[1]:
            best = (byte, visits.get(after, 0))
    return best[0]

"""A reply's bookkeeping, shared by every protocol: usage, stop strings, tool calls held back and parsed, the end.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..processing.tools import ToolCall, parse_tool_calls

CALL_OPENINGS = ("[", "{", "`")  # how a reply that may be a tool call begins (a list, a JSON object, a fence)


@dataclass(frozen=True)
class Usage:
    """Token counts of one reply: the prompt (of which `cached_tokens` came from the prompt cache) and the reply."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens the model had to read (the rest came from the prompt cache)."""
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True)
class Delta:
    """Reply text the client may be shown now, with the logprob entries of the tokens that made it and the usage
    so far."""

    text: str
    logprobs: list = field(default_factory=list)
    usage: Usage = Usage()


@dataclass(frozen=True)
class Ending:
    """How a reply ended. `reason`: "stop" (an end token), "length" (the token budget), "stop_string" (one of the
    request's stop strings, `stop_string`), "dead_end" (the constraint allowed nothing more) or "tool_calls"
    (the reply holds `calls`). `text`: the reply's text as shown to the client (without the text of calls that
    were held back, which the client never sees as text); `raw`: the whole reply as the model wrote it."""

    reason: str
    text: str
    usage: Usage
    calls: tuple[ToolCall, ...] = ()
    stop_string: str | None = None
    logprobs: list = field(default_factory=list)
    raw: str = ""


@dataclass(frozen=True)
class Piece:
    """Text cut by the stop strings; `finish`: the engine's reason, or "stop_string", when it is the last."""

    text: str
    finish: str | None
    logprobs: list
    stop_string: str | None = None


class Tally:
    """Counts the engine's steps of a reply for its usage."""

    def __init__(self):
        self.usage = Usage()

    def count(self, steps):
        for step in steps:
            self.usage = Usage(step.prompt_tokens, self.usage.completion_tokens + 1, step.reused_tokens)
            yield step


def cut_at_stops(steps, stops: list[str]) -> Iterator[Piece]:
    """Pieces of the reply; a stop string ends it unsent, and text that could begin one is held back until it
    cannot."""
    held, entries = "", []
    for step in steps:
        held += step.text
        entries += [step.logprob] if step.logprob else []
        found = [(held.find(s), s) for s in stops if s in held]
        if found:
            cut, stop = min(found)
            yield Piece(held[:cut], "stop_string", entries, stop)
            return
        partial = max((k for s in stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        out, held = held[: len(held) - partial], held[len(held) - partial :]
        if step.finish:
            yield Piece(out + held, step.finish, entries)
            return
        if out:
            yield Piece(out, None, entries)
            entries = []


def reply_events(steps: Iterable, stops: list[str], tools: bool) -> Iterator[Delta | Ending]:
    """The reply as Deltas to show, then its Ending. With `tools`, text that may still be a tool call (it opens
    like one) is held back until it cannot be one; at the end, held text that parses as calls becomes the
    Ending's calls and is never shown, and shown text with calls in it (in a fence) gives its calls too."""
    tally, shown, entries_all = Tally(), [], []
    held, held_entries, holding = "", [], tools
    finish, stop_string = "length", None  # when the steps end without a reason
    for piece in cut_at_stops(tally.count(steps), stops):
        entries_all += piece.logprobs
        finish, stop_string = piece.finish or finish, piece.stop_string
        if holding:
            held, held_entries = held + piece.text, held_entries + piece.logprobs
            if piece.finish is None and may_be_call(held):
                continue
            holding = False
            if piece.finish is not None and (calls := parse_tool_calls(held)):
                yield Ending("tool_calls", "", tally.usage, tuple(calls), None, entries_all, held)
                return
            piece = Piece(held, piece.finish, held_entries, piece.stop_string)
        if piece.text:
            shown.append(piece.text)
            yield Delta(piece.text, piece.logprobs, tally.usage)
        if piece.finish is not None:
            break
    if holding and held:
        shown.append(held)
        yield Delta(held, held_entries, tally.usage)
    text = "".join(shown)
    calls = tuple(parse_tool_calls(text)) if tools else ()
    if calls:
        yield Ending("tool_calls", text, tally.usage, calls, None, entries_all, text)
    else:
        yield Ending(finish, text, tally.usage, (), stop_string, entries_all, text)


def may_be_call(text: str) -> bool:
    stripped = text.lstrip()
    return not stripped or stripped.startswith(CALL_OPENINGS)


def whole_reply(steps: Iterable, stops: list[str], tools: bool) -> Ending:
    """The Ending of a reply read to its end."""
    *_, ending = reply_events(steps, stops, tools)
    return ending


def sse(payload: dict | str, event: str | None = None) -> bytes:
    """One server-sent event: `event: NAME` (when named) and its JSON data (or a bare string such as [DONE])."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return (f"event: {event}\n" if event else "").encode() + b"data: " + data.encode() + b"\n\n"

"""The reply bookkeeping every protocol shares (serve/reply.py): stop strings, tool calls held back, usage."""

from __future__ import annotations

from typing import NamedTuple

from mlx_gemma3.processing.tools import ToolCall
from mlx_gemma3.serve.reply import Delta, Ending, reply_events


class Step(NamedTuple):
    """What the worker hands out per token (serve/worker.py's steps), as reply_events reads it."""

    text: str
    token: int
    finish: str | None
    prompt_tokens: int
    reused_tokens: int
    logprob: dict | None = None


def steps(*pieces: str, finish: str = "stop", prompt: int = 7, reused: int = 3) -> list[Step]:
    """The engine's steps for text pieces (one token each), the last one ending the reply."""
    last = len(pieces) - 1
    return [Step(text, i, finish if i == last else None, prompt, reused) for i, text in enumerate(pieces)]


def test_text_streams_and_the_ending_counts_usage():
    events = list(reply_events(steps("Hel", "lo", " you", ""), [], tools=False))
    assert [e.text for e in events if isinstance(e, Delta)] == ["Hel", "lo", " you"]
    ending = events[-1]
    assert (ending.reason, ending.text, ending.raw, ending.calls) == ("stop", "Hello you", "Hello you", ())
    assert (ending.usage.prompt_tokens, ending.usage.completion_tokens, ending.usage.cached_tokens) == (7, 4, 3)


def test_a_stop_string_across_pieces_is_held_back_then_cut():
    events = list(reply_events(steps("one t", "wo th", "ree", finish="length"), ["two"], tools=False))
    assert [e.text for e in events if isinstance(e, Delta)] == ["one "]
    assert (events[-1].reason, events[-1].stop_string, events[-1].text) == ("stop_string", "two", "one ")


def test_text_that_opens_like_a_call_is_held_and_becomes_the_calls():
    events = list(reply_events(steps("[get(", "city='Oslo'", ")]", ""), [], tools=True))
    assert len(events) == 1 and events[0].reason == "tool_calls"
    assert events[0].calls == (ToolCall("get", {"city": "Oslo"}),) and events[0].text == ""
    assert events[0].raw == "[get(city='Oslo')]"


def test_held_text_that_is_no_call_is_shown_once_it_cannot_be_one():
    events = list(reply_events(steps("  ", "[1] is", " a note", ""), [], tools=True))
    assert [e.text for e in events if isinstance(e, Delta)] == ["  [1] is a note"]  # held to the end: it opened with [
    events = list(reply_events(steps(" ", "Sunny", " today", ""), [], tools=True))
    assert [e.text for e in events if isinstance(e, Delta)] == [" Sunny", " today"]
    assert events[-1] == Ending("stop", " Sunny today", events[-1].usage, raw=" Sunny today")


def test_a_call_fenced_inside_prose_is_shown_and_parsed():
    reply = "Let me look.\n```\n[get(city='Lima')]\n```"
    events = list(reply_events(steps(reply, ""), [], tools=True))
    assert isinstance(events[0], Delta) and events[0].text == reply
    assert events[-1].reason == "tool_calls" and events[-1].calls == (ToolCall("get", {"city": "Lima"}),)

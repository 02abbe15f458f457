"""Function calling: schemas from callables, the prompt text, and the call parser on model-style outputs."""

from __future__ import annotations

import json
from typing import Literal

import pytest

from mlx_gemma3 import Gemma3Error
from mlx_gemma3.processing.tools import (
    ToolCall,
    as_tool,
    call_tool,
    parse_tool_calls,
    tool_results_text,
    tools_prompt,
    with_tools,
)


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius", days: int | None = None) -> dict:
    """Current weather for a city.

    Args:
        city: the city's name, e.g. Seoul
        unit: temperature unit
        days: how many days of forecast
    """
    return {"city": city, "unit": unit, "temp": 21}


def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


def test_schema_from_a_function():
    tool = as_tool(get_weather)
    assert tool.name == "get_weather" and tool.description == "Current weather for a city."
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "the city's name, e.g. Seoul"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "temperature unit"},
            "days": {"type": "integer", "description": "how many days of forecast"},
        },
        "required": ["city"],
    }


def test_schema_dicts_plain_and_openai():
    plain = {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}
    openai = {"type": "function", "function": plain}
    assert as_tool(plain) == as_tool(openai) and as_tool(plain).schema() == plain
    for bad in ({"name": "not an id"}, {"name": "f", "parameters": {"type": "array"}}, 42):
        with pytest.raises(Gemma3Error):
            as_tool(bad)


@pytest.mark.parametrize("style", ["python", "json"])
def test_prompt_lists_every_schema_and_the_answer_form(style):
    text = tools_prompt([get_weather, add], style)
    schemas = json.loads(text[text.index("\n\n[") :])
    assert [s["name"] for s in schemas] == ["get_weather", "add"]
    assert ("[name1(arg1=value1" in text) == (style == "python") and ('{"name": function name' in text) == (
        style == "json"
    )
    messages = with_tools([{"role": "user", "content": "Weather in Seoul?"}], [get_weather], style)
    assert messages[0]["content"].startswith(tools_prompt([get_weather], style)) and messages[0]["content"].endswith(
        "Weather in Seoul?"
    )
    with pytest.raises(Gemma3Error):
        tools_prompt([add], "xml")


W = "get_weather"
CORPUS = [
    # Python style, bare and fenced
    ('[get_weather(city="Seoul")]', [(W, {"city": "Seoul"})]),
    ("[get_weather(city='Paris', unit='fahrenheit')]", [(W, {"city": "Paris", "unit": "fahrenheit"})]),
    ('get_weather(city="Tokyo")', [(W, {"city": "Tokyo"})]),
    ('```tool_code\n[get_weather(city="Lima")]\n```', [(W, {"city": "Lima"})]),
    ('```python\nget_weather(city="Oslo", days=3)\n```', [(W, {"city": "Oslo", "days": 3})]),
    ("```\n[add(a=1, b=2.5)]\n```", [("add", {"a": 1, "b": 2.5})]),
    ('  \n [get_weather(city="Rome")] \n\n', [(W, {"city": "Rome"})]),
    ('[get_weather(city="Seoul"), add(a=1, b=2)]', [(W, {"city": "Seoul"}), ("add", {"a": 1, "b": 2})]),
    ('[get_weather(city="서울"), get_weather(city="東京")]', [(W, {"city": "서울"}), (W, {"city": "東京"})]),
    (
        '[f(x=[1, 2, {"k": (3, 4)}], y={"a": None, "b": True})]',
        [("f", {"x": [1, 2, {"k": [3, 4]}], "y": {"a": None, "b": True}})],
    ),
    ("[f(flag=true, other=null, n=-1.5e3)]", [("f", {"flag": True, "other": None, "n": -1500.0})]),
    ('[tools.search(query="émoji 🎉")]', [("tools.search", {"query": "émoji 🎉"})]),
    ("[noargs()]", [("noargs", {})]),
    ('Sure!\n```tool_code\nget_weather(city="Cairo")\n```', [(W, {"city": "Cairo"})]),
    # JSON style, bare and fenced
    ('{"name": "get_weather", "parameters": {"city": "Seoul"}}', [(W, {"city": "Seoul"})]),
    (
        '{"name": "get_weather", "arguments": {"city": "Berlin", "unit": "celsius"}}',
        [(W, {"city": "Berlin", "unit": "celsius"})],
    ),
    ('```json\n{"name": "add", "parameters": {"a": 1, "b": 2}}\n```', [("add", {"a": 1, "b": 2})]),
    (
        '[{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "get_weather", "parameters": {"city": "Rio"}}]',
        [("add", {"a": 1, "b": 2}), (W, {"city": "Rio"})],
    ),
    (
        '{"name": "f", "parameters": {"nested": {"deep": [1, {"x": "y"}]}, "s": "\\u00e9"}}',
        [("f", {"nested": {"deep": [1, {"x": "y"}]}, "s": "é"})],
    ),
    ('{"name": "f", "arguments": "{\\"q\\": \\"한국어\\"}"}', [("f", {"q": "한국어"})]),
    ('  {"name": "noargs"}  ', [("noargs", {})]),
    (
        'I will call it:\n```json\n{"name": "get_weather", "parameters": {"city": "Nairobi"}}\n```',
        [(W, {"city": "Nairobi"})],
    ),
    # Prose and malformed: no calls
    ("The weather in Seoul is sunny today.", []),
    ("I can't call any function for that.", []),
    ("", []),
    ("[1, 2, 3]", []),
    ('{"city": "Seoul"}', []),
    ('[get_weather("Seoul")]', []),  # positional arguments: not the documented form
    ('[get_weather(city=input("x"))]', []),  # a call inside an argument is never evaluated
    ("[get_weather(city=__import__('os').system('echo pwned'))]", []),
    ("[get_weather(city=x)]", []),  # a bare name is not a literal
    ('[get_weather(city="Seoul")', []),  # unbalanced
    ('{"name": "get_weather", "parameters": {"city": "Seoul"}', []),  # truncated JSON
    ('{"name": "f", "parameters": [1, 2]}', []),
    ("```\nprint('hello')\n```", []),
    ("[get_weather(**kwargs)]", []),
    ("get_weather(city='a') + 1", []),
    ("lambda: get_weather(city='a')", []),
]


@pytest.mark.parametrize("text,expected", CORPUS, ids=[str(i) for i in range(len(CORPUS))])
def test_parser_corpus(text, expected):
    assert parse_tool_calls(text) == [ToolCall(name, args) for name, args in expected]


# Arguments of every JSON type, written below by the reference writers of each answer form.
ROUND_TRIP = [
    {"city": "Seoul"},
    {"a": 1, "b": -2.5e-3, "c": 2**63 + 1},  # past int64 and past what a float holds exactly
    {"query": "émoji 🎉, \"double\" and 'single' quotes, a \\ backslash\nand a newline", "flag": True, "none": None},
    {"nested": {"list": [1, [2, 3], {"k": "v"}, []], "empty": {}}, "n": 0, "no": False},
]


@pytest.mark.parametrize("arguments", ROUND_TRIP, ids=[str(i) for i in range(len(ROUND_TRIP))])
@pytest.mark.parametrize("style", ["python", "json"])
def test_calls_written_by_the_reference_writers_parse_back(style, arguments):
    """The two answer forms the prompt asks for, written by Python's repr and by json.dumps: each parses back to
    the call that was written, in both its bare and fenced forms."""
    if style == "python":
        text = "[get_weather(" + ", ".join(f"{key}={value!r}" for key, value in arguments.items()) + ")]"
    else:
        text = json.dumps({"name": "get_weather", "parameters": arguments})
    for written in (text, f"```tool_code\n{text}\n```"):
        assert parse_tool_calls(written) == [ToolCall("get_weather", arguments)], written


def test_parser_never_runs_code(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.chdir(tmp_path)
    parse_tool_calls(f"[f(x=open({str(marker)!r}, 'w').write('x'))]")
    parse_tool_calls(f"open({str(marker)!r}, 'w')")
    assert not marker.exists()


def test_calling_tools_and_reporting_results():
    tools = {t.name: t for t in map(as_tool, [get_weather, add])}
    calls = parse_tool_calls('[add(a=2, b=3), get_weather(city="Seoul"), nope(x=1), add(a=1)]')
    results = [call_tool(tools, call) for call in calls]
    assert results[:2] == [5, {"city": "Seoul", "unit": "celsius", "temp": 21}]
    assert results[2] == {"error": "unknown function 'nope'"} and "bad arguments for add" in results[3]["error"]
    text = tool_results_text(calls[:1], results[:1])
    assert text == '```tool_output\n{"name": "add", "result": 5}\n```'

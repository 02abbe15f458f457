"""Constrained replies on the real 270M through the Anthropic and Responses APIs: a tool_use under tool_choice any,
and a text.format json_schema, each valid under its schema (checked by jsonschema)."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest
from server_process import ServerProcess

pytestmark = pytest.mark.slow

FORECAST = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "days"],
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(lossless_conversion):
    served = ServerProcess("--model", str(lossless_conversion.folder))
    yield served
    served.stop()


def test_tool_use_under_tool_choice_any_is_valid_under_its_schema(server):
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=600)
    tool = {"name": "get_forecast", "description": "The weather forecast for a city", "input_schema": FORECAST}
    message = claude.messages.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "What will the weather be in Lisbon for the next three days?"}],
        tools=[tool],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        max_tokens=60,
    )
    assert message.stop_reason == "tool_use" and [block.type for block in message.content] == ["tool_use"]
    assert message.content[0].name == "get_forecast"
    jsonschema.validate(message.content[0].input, FORECAST)


def test_text_format_json_schema_is_valid_under_its_schema(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=600)
    response = client.responses.create(
        model="gemma-3-270m",
        input="Ada Lovelace was born in 1815 and died at 36. Her name and age at death:",
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}},
        max_output_tokens=60,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), PERSON)

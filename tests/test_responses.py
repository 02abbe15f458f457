"""The OpenAI Responses API (/v1/responses) of a real server process, through the official `openai` SDK: replies
equal the chat completions path's on the same conversation, events in the API's order, function calls and their
outputs, previous_response_id continuing from the prompt cache, text.format constrained, stored responses."""

from __future__ import annotations

import base64
import io
import json

import jsonschema
import openai
import pytest
from PIL import Image
from server_process import two_model_server

SAMPLED = {"temperature": 1.0, "seed": 3}  # the lively models' replies vary when sampled (conftest.py)
PICK = {
    "type": "function",
    "name": "pick_city",
    "description": "Pick a city for the forecast",
    "parameters": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "metric": {"type": "boolean"}},
        "required": ["city", "metric"],
    },
}


@pytest.fixture(scope="module")
def server(lively_image_model, lively_chat_model):
    """The tiny multimodal model as "tiny" and the tiny text model as "tiny-text"."""
    served = two_model_server(lively_image_model, lively_chat_model)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def respond(client, **ask):
    """responses.create, sampled with a seed (the seed is this server's extension)."""
    return client.responses.create(model="tiny", temperature=SAMPLED["temperature"], extra_body={"seed": 3}, **ask)


def chat_reference(client, messages: list[dict], max_tokens: int, **extra):
    """The chat completions path's reply to the same conversation."""
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, **SAMPLED, **extra)


def test_create_equals_the_chat_completions_reply(client):
    reference = chat_reference(
        client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}], 12
    )
    response = respond(client, instructions="Be brief.", input="Hello there!", max_output_tokens=12, store=False)
    assert response.output_text == reference.choices[0].message.content and len(set(response.output_text)) > 3
    finish = reference.choices[0].finish_reason
    assert response.status == {"stop": "completed", "length": "incomplete"}[finish]
    if finish == "length":
        assert response.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in response.output] == ["message"] and response.output[0].role == "assistant"
    assert response.usage.input_tokens == reference.usage.prompt_tokens
    assert response.usage.output_tokens == reference.usage.completion_tokens
    assert response.id.startswith("resp_") and response.model == "tiny" and response.instructions == "Be brief."


def test_stream_events_and_final_response(client):
    whole = respond(client, input="Tell me a story.", max_output_tokens=15, store=False)
    ask = dict(model="tiny", input="Tell me a story.", max_output_tokens=15, temperature=1.0, store=False)
    with client.responses.stream(**ask, extra_body={"seed": 3}) as stream:
        events = list(stream)
    final = events[-1].response  # the SDK's get_final_response() waits for response.completed only
    kinds = [event.type for event in events]
    opening = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    closing = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[:4] == opening and kinds[-4:-1] == closing
    assert set(kinds[4:-4]) == {"response.output_text.delta"} and kinds[-1] == f"response.{whole.status}"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == whole.output_text == final.output_text and len(deltas) > 1
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_a_function_call_and_its_output_render_as_the_chat_completions_path_does(client):
    call = respond(
        client, input="Weather?", tools=[PICK], tool_choice="required", parallel_tool_calls=False, max_output_tokens=40
    )
    assert [item.type for item in call.output] == ["function_call"] and call.status == "completed"
    item = call.output[0]
    assert item.name == "pick_city" and item.call_id.startswith("call_")
    jsonschema.validate(json.loads(item.arguments), PICK["parameters"])
    items = [
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments},
        {"type": "function_call_output", "call_id": item.call_id, "output": "-3 C, snow"},
    ]
    answer = respond(client, input=items, tools=[PICK], max_output_tokens=8)
    chat_call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [chat_call]},
        {"role": "tool", "tool_call_id": item.call_id, "content": "-3 C, snow"},
    ]
    tool = {"type": "function", "function": {k: v for k, v in PICK.items() if k != "type"}}
    reference = chat_reference(client, messages, 8, tools=[tool])
    assert answer.usage.input_tokens == reference.usage.prompt_tokens
    assert answer.output_text == (reference.choices[0].message.content or "")


def test_previous_response_id_continues_from_the_prompt_cache(client):
    first = respond(client, input="Hello there!", max_output_tokens=10)
    second = respond(client, previous_response_id=first.id, input="And then?", max_output_tokens=10)
    cached = second.usage.input_tokens_details.cached_tokens
    assert first.usage.input_tokens <= cached < second.usage.input_tokens  # the previous turn was not read again
    history = [
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"},
    ]
    reference = chat_reference(client, history, 10)
    assert second.usage.input_tokens == reference.usage.prompt_tokens
    assert second.output_text == reference.choices[0].message.content
    assert second.previous_response_id == first.id


def test_a_function_call_output_continues_a_stored_call(client):
    call = respond(
        client, input="Weather?", tools=[PICK], tool_choice="required", parallel_tool_calls=False, max_output_tokens=60
    )
    item = call.output[0]
    output = {"type": "function_call_output", "call_id": item.call_id, "output": "-3 C"}
    answer = respond(client, previous_response_id=call.id, input=[output], tools=[PICK], max_output_tokens=5)
    assert answer.usage.input_tokens_details.cached_tokens >= call.usage.input_tokens


def test_stored_responses_are_retrieved_and_deleted(client):
    stored = respond(client, input="Hello there!", max_output_tokens=4)
    again = client.responses.retrieve(stored.id)
    assert (again.id, again.output_text, again.usage.output_tokens) == (stored.id, stored.output_text, 4)
    client.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(stored.id)
    unstored = respond(client, input="Hello there!", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_text_format_json_schema_is_followed(client):
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    text = {"format": {"type": "json_schema", "name": "forecast", "schema": schema, "strict": True}}
    response = respond(client, input="Forecast?", text=text, max_output_tokens=40)
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"


def png_url(color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_an_input_image_equals_the_chat_completions_image_reply(client):
    url = png_url("teal")
    content = [{"type": "input_image", "image_url": url, "detail": "auto"}, {"type": "input_text", "text": "What?"}]
    response = respond(client, input=[{"role": "user", "content": content}], max_output_tokens=10)
    chat_content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]
    reference = chat_reference(client, [{"role": "user", "content": chat_content}], 10)
    assert response.output_text == reference.choices[0].message.content


@pytest.mark.parametrize(
    "ask,error,message",
    [
        ({"previous_response_id": "resp_gone"}, openai.BadRequestError, "no stored response with id 'resp_gone'"),
        ({"model": "gpt-5"}, openai.NotFoundError, "'gpt-5' is not served here"),
        ({"tools": [{"type": "web_search"}]}, openai.BadRequestError, "only function tools"),
        ({"text": {"format": {"type": "xml"}}}, openai.BadRequestError, "'text.format' must be"),
        ({"tools": [PICK], "text": {"format": {"type": "json_object"}}}, openai.BadRequestError, "cannot constrain"),
        ({"input": [{"type": "reasoning", "summary": []}]}, openai.BadRequestError, "got 'reasoning'"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_errors_are_the_sdks_own_exceptions(client, ask, error, message, stream):
    ask = {"model": "tiny", "input": "Hello there!", "max_output_tokens": 4, **ask}
    with pytest.raises(error) as raised:
        if stream:
            with client.responses.stream(**ask) as events:
                events.get_final_response()
        else:
            client.responses.create(**ask)
    assert message in raised.value.body["message"]

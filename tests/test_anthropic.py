"""The Anthropic Messages API (/v1/messages) of a real server process, through the official `anthropic` SDK: replies
equal the chat completions path's on the same conversation, events in the API's order, tools constrained to their
schema, the tool loop, images, errors as the SDK's own exceptions."""

from __future__ import annotations

import base64
import http.client
import io
import json

import anthropic
import jsonschema
import openai
import pytest
from PIL import Image
from server_process import two_model_server

KEY = "sesame"
HELLO = [{"role": "user", "content": "Hello there!"}]
SAMPLED = {"temperature": 1.0, "seed": 3}  # the lively models' replies vary when sampled (conftest.py)
PICK = {
    "name": "pick_city",
    "description": "Pick a city for the forecast",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "metric": {"type": "boolean"}},
        "required": ["city", "metric"],
    },
}


@pytest.fixture(scope="module")
def server(lively_image_model, lively_chat_model):
    """The tiny multimodal model as "tiny" and the tiny text model as "tiny-text", behind an API key."""
    served = two_model_server(lively_image_model, lively_chat_model, "--api-key", KEY)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def gpt(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def chat_reference(gpt, messages: list[dict], max_tokens: int, model: str = "tiny", **extra):
    """The chat completions path's reply to the same conversation (OpenAI's form of it)."""
    return gpt.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, **SAMPLED, **extra)


def test_create_equals_the_chat_completions_reply(claude, gpt):
    system = "Answer in one word."
    reference = chat_reference(gpt, [{"role": "system", "content": system}, *HELLO], 12)
    message = claude.messages.create(model="tiny", system=system, messages=HELLO, max_tokens=12, extra_body=SAMPLED)
    assert message.content[0].type == "text" and message.content[0].text == reference.choices[0].message.content
    expected_reason = {"stop": "end_turn", "length": "max_tokens"}[reference.choices[0].finish_reason]
    assert (message.role, message.stop_reason, message.stop_sequence) == ("assistant", expected_reason, None)
    usage = message.usage  # the same prompt again: all but its last token come from the prompt cache
    assert usage.input_tokens + usage.cache_read_input_tokens == reference.usage.prompt_tokens
    assert usage.cache_read_input_tokens == reference.usage.prompt_tokens - 1
    assert usage.output_tokens == reference.usage.completion_tokens and message.model == "tiny"


def test_system_blocks_and_count_tokens(claude, gpt):
    blocks = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]
    reference = chat_reference(gpt, [{"role": "system", "content": "Be brief.\nBe kind."}, *HELLO], 1)
    counted = claude.messages.count_tokens(model="tiny", system=blocks, messages=HELLO)
    assert counted.input_tokens == reference.usage.prompt_tokens


def test_stream_gives_the_same_message(claude):
    whole = claude.messages.create(model="tiny", messages=HELLO, max_tokens=15, extra_body=SAMPLED)
    with claude.messages.stream(model="tiny", messages=HELLO, max_tokens=15, extra_body=SAMPLED) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == whole.content[0].text
    assert [block.text for block in final.content] == [whole.content[0].text]
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def raw_events(port: int, body: dict, headers: dict) -> list[tuple[str, dict]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/v1/messages", json.dumps(body), {"Content-Type": "application/json", **headers})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    text = response.read().decode()
    connection.close()
    events = []
    for frame in text.strip().split("\n\n"):
        name, data = frame.split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def test_stream_events_come_in_the_api_order_and_x_api_key_is_accepted(server):
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 6, "stream": True, **SAMPLED}
    events = raw_events(server.port, body, {"x-api-key": KEY})
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert set(names[3:-3]) == {"content_block_delta"} and names[-3:] == [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert events[-2][1]["usage"]["output_tokens"] == 6 and events[-2][1]["delta"]["stop_reason"] == "max_tokens"


def test_stop_sequences_end_the_message(claude):
    text = claude.messages.create(model="tiny", messages=HELLO, max_tokens=20, extra_body=SAMPLED).content[0].text
    at = next(k for k in range(2, len(text) - 3) if text.find(text[k : k + 3]) == k)  # a stop first seen there
    stop = text[at : at + 3]
    cut = claude.messages.create(model="tiny", messages=HELLO, max_tokens=20, stop_sequences=[stop], extra_body=SAMPLED)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.find(stop)]


def test_tool_choice_any_gives_a_tool_use_valid_under_its_schema(claude):
    for stream in (False, True):
        ask = dict(model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[PICK], max_tokens=40)
        ask["tool_choice"] = {"type": "any", "disable_parallel_tool_use": True}  # one call
        if stream:
            with claude.messages.stream(**ask) as events:
                message = events.get_final_message()
        else:
            message = claude.messages.create(**ask)
        assert message.stop_reason == "tool_use" and [block.type for block in message.content] == ["tool_use"]
        use = message.content[0]
        assert use.name == "pick_city" and use.id.startswith("toolu_")
        jsonschema.validate(use.input, PICK["input_schema"])


def test_a_tool_loop_renders_as_the_chat_completions_path_does(claude, gpt):
    question = {"role": "user", "content": "Weather in Oslo?"}
    use = {"type": "tool_use", "id": "toolu_1", "name": "pick_city", "input": {"city": "Oslo", "metric": True}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "-3 C, snow"}]}
    loop = [question, {"role": "assistant", "content": [use]}, {"role": "user", "content": [result]}]
    message = claude.messages.create(model="tiny", messages=loop, tools=[PICK], max_tokens=8, extra_body=SAMPLED)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "pick_city", "arguments": json.dumps(use["input"])},
    }
    openai_loop = [
        question,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"},
    ]
    tool = {"type": "function", "function": {"name": PICK["name"], "description": PICK["description"]}}
    tool["function"]["parameters"] = PICK["input_schema"]
    reference = chat_reference(gpt, openai_loop, 8, tools=[tool])
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == reference.usage.prompt_tokens
    if reference.choices[0].message.tool_calls:
        assert [b.input for b in message.content] == [
            json.loads(reference.choices[0].message.tool_calls[0].function.arguments)
        ]
    else:
        assert message.content[0].text == reference.choices[0].message.content


def png_base64(color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_an_image_block_equals_the_chat_completions_image_reply(claude, gpt):
    data = png_base64("orange")
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    message = claude.messages.create(
        model="tiny",
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}],
        max_tokens=10,
        extra_body=SAMPLED,
    )
    url = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}
    content = [url, {"type": "text", "text": "What is it?"}]
    reference = chat_reference(gpt, [{"role": "user", "content": content}], 10, model="tiny")
    assert message.content[0].text == reference.choices[0].message.content and message.model == "tiny"
    assert message.usage.input_tokens == reference.usage.prompt_tokens  # images bypass the prompt cache


@pytest.mark.parametrize(
    "extra,error,message",
    [
        ({"tool_choice": {"type": "any"}}, anthropic.BadRequestError, "has no 'tools'"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, anthropic.BadRequestError, "does not think"),
        ({"model": "claude-opus"}, anthropic.NotFoundError, "'claude-opus' is not served here"),
        ({"messages": [*HELLO, {"role": "assistant", "content": "Hi"}]}, anthropic.BadRequestError, "prefill"),
        ({"stop_sequences": "END"}, anthropic.BadRequestError, "'stop_sequences' must be"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_errors_are_the_sdks_own_exceptions(claude, extra, error, message, stream):
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 4, **extra}
    with pytest.raises(error) as raised:
        if stream:
            with claude.messages.stream(**body) as events:
                events.get_final_message()
        else:
            claude.messages.create(**body)
    assert message in raised.value.message and raised.value.body["type"] == "error"


def test_max_tokens_is_required(claude):
    with pytest.raises(anthropic.BadRequestError) as raised:  # the SDK itself insists: a raw post
        claude.post("/v1/messages", body={"model": "tiny", "messages": HELLO}, cast_to=anthropic.types.Message)
    assert raised.value.body["error"] == {
        "type": "invalid_request_error",
        "message": raised.value.body["error"]["message"],
    }
    assert "'max_tokens' is required" in raised.value.message


def test_a_wrong_key_is_an_authentication_error(server):
    wrong = anthropic.Anthropic(base_url=server.url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as raised:
        wrong.messages.create(model="tiny", messages=HELLO, max_tokens=2)
    assert raised.value.body["error"]["type"] == "authentication_error"

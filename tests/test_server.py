"""The OpenAI-compatible server over real HTTP on 127.0.0.1 with a tiny model."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading

import mlx.core as mx
import pytest
import torch
from conftest import StepCounter as Counter
from conftest import running_jobs
from PIL import Image

import mlx_gemma3
from mlx_gemma3.processing.prompt import prompt_ids
from mlx_gemma3.serve.http import ServerState, make_server


class Forcer:
    """A logits processor that makes the model say `ids`, then end its turn; counts the steps it saw."""

    def __init__(self, ids: list[int]):
        self.ids, self.first, self.steps = [*ids, 106], None, 0

    def __call__(self, tokens, logits):
        self.first = tokens.size if self.first is None else self.first
        self.steps += 1
        step = min(tokens.size - self.first, len(self.ids) - 1)
        return mx.where(mx.arange(logits.shape[-1]) == self.ids[step], 1e4, logits)


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    folder, _, reference = tiny_chat_model
    model, processor = mlx_gemma3.load(folder)
    state = ServerState(model, processor, "tiny", max_tokens_limit=600, max_body_bytes=100_000)
    httpd = make_server(state, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1], state, reference
    httpd.shutdown()
    httpd.server_close()


def request(port: int, method: str, path: str, body=None, raw: bytes | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, payload


def chat(port: int, **body):
    status, payload = request(port, "POST", "/v1/chat/completions", body)
    return status, json.loads(payload)


def sse_text(port: int, body: dict) -> tuple[str, list[dict]]:
    status, payload = request(port, "POST", "/v1/chat/completions", {**body, "stream": True})
    assert status == 200
    events = [line[6:] for line in payload.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks), chunks


HELLO = [{"role": "user", "content": "Hello there!"}]


def test_health_and_models(server):
    port, _, _ = server
    assert request(port, "GET", "/health") == (200, b'{"status": "ok"}')
    status, payload = request(port, "GET", "/v1/models")
    assert status == 200 and json.loads(payload)["data"][0]["id"] == "tiny"


def test_chat_matches_transformers_greedy(server):
    port, state, reference = server
    status, body = chat(port, messages=HELLO, max_tokens=12)
    assert status == 200
    ids = prompt_ids(state.processor, HELLO)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=[1, 106], pad_token_id=0
        )
    expected = state.processor.tokenizer.decode([t for t in out[0, len(ids) :].tolist() if t not in (1, 106)])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["usage"]["prompt_tokens"] == len(ids) and body["object"] == "chat.completion"


def test_streamed_chunks_concatenate_to_the_same_text(server):
    port, state, _ = server
    state.extra_options["logits_processors"] = [lambda tokens, logits: logits * 0.02]  # the tiny model is too sure
    try:
        request_body = dict(messages=HELLO, max_tokens=20, temperature=1.0, seed=11)
        _, whole = chat(port, **request_body)
        streamed, chunks = sse_text(port, request_body)
        other = chat(port, **{**request_body, "seed": 12})[1]["choices"][0]["message"]["content"]
    finally:
        state.extra_options.clear()
    assert streamed == whole["choices"][0]["message"]["content"] and len(chunks) > 2
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert other != streamed


def test_stop_strings_cut_the_reply(server):
    port, state, _ = server
    state.extra_options["logits_processors"] = [
        Forcer(state.processor.tokenizer.encode("one two three four", add_bos=False))
    ]
    try:
        _, body = chat(port, messages=HELLO, max_tokens=30, stop=[" three"])
        streamed, _ = sse_text(port, dict(messages=HELLO, max_tokens=30, stop=" three"))
    finally:
        state.extra_options.clear()
    assert body["choices"][0]["message"]["content"] == "one two" == streamed
    assert body["choices"][0]["finish_reason"] == "stop"


def test_completions_endpoint(server):
    port, state, reference = server
    status, payload = request(port, "POST", "/v1/completions", {"prompt": "Once upon", "max_tokens": 8})
    body = json.loads(payload)
    ids = state.processor.tokenizer.encode("Once upon")
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=[1, 106], pad_token_id=0
        )
    expected = state.processor.tokenizer.decode([t for t in out[0, len(ids) :].tolist() if t not in (1, 106)])
    assert status == 200 and body["choices"][0]["text"] == expected and body["object"] == "text_completion"


def test_tool_calls_round_trip(server):
    port, state, _ = server
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    call_text = '[get_weather(city="Seoul")]'
    forcer = Forcer(state.processor.tokenizer.encode(call_text, add_bos=False))
    state.extra_options["logits_processors"] = [forcer]
    try:
        status, body = chat(
            port, messages=[{"role": "user", "content": "Weather in Seoul?"}], tools=[weather], max_tokens=60
        )
    finally:
        state.extra_options.clear()
    assert status == 200
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Seoul"}
    _, plain = chat(port, messages=[{"role": "user", "content": "Weather in Seoul?"}], max_tokens=1)
    assert body["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 20  # the schema was in the prompt
    follow_up = [
        {"role": "user", "content": "Weather in Seoul?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "name": "get_weather", "content": "21 degrees, sunny"},
    ]
    status, body = chat(port, messages=follow_up, tools=[weather], max_tokens=5)
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def png_data_url(color: str) -> tuple[str, Image.Image]:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), Image.open(buffer).convert("RGB")


def test_image_message_to_a_text_model_is_a_400(server):
    port, _, _ = server
    url, _ = png_data_url("blue")
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
    status, body = chat(port, messages=[{"role": "user", "content": content}], max_tokens=4)
    assert status == 400 and "reads text only" in body["error"]["message"]


def test_image_message_matches_transformers(image_chat_model, tmp_path):
    from mlx_gemma3.processing.prompt import gemma_chat

    _, model, processor, hf, hf_processor = image_chat_model
    httpd = make_server(ServerState(model, processor, "tiny-vlm", image_dirs=(tmp_path,)), "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url, picture = png_data_url("orange")
        picture.save(tmp_path / "b.png")
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is it?"},
            {"type": "image_url", "image_url": {"url": str(tmp_path / "b.png")}},
        ]
        status, body = chat(httpd.server_address[1], messages=[{"role": "user", "content": content}], max_tokens=12)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert status == 200
    text = gemma_chat(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}, {"type": "image"}]}]
    )
    inputs = hf_processor(text=text.removeprefix("<bos>"), images=[picture, picture], return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=[1, 106], pad_token_id=0)
    new = [t for t in out[0, inputs["input_ids"].shape[1] :].tolist() if t not in (1, 106)]
    assert body["choices"][0]["message"]["content"] == processor.tokenizer.decode(new)


BAD = [
    (b"{not json", "not valid JSON"),
    (json.dumps({"messages": []}).encode(), "'messages' must be a non-empty list"),
    (json.dumps({"messages": HELLO, "temperature": "hot"}).encode(), "'temperature' must be a number"),
    (json.dumps({"messages": HELLO, "max_tokens": 100000}).encode(), "'max_tokens' must lie in"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "role 'robot'"),
    (json.dumps({"messages": HELLO, "stop": [1]}).encode(), "'stop' must be"),
    (json.dumps([1, 2]).encode(), "must be a JSON object"),
]


@pytest.mark.parametrize("raw,message", BAD)
def test_bad_requests_get_openai_style_400s(server, raw, message):
    port, _, _ = server
    status, payload = request(port, "POST", "/v1/chat/completions", raw=raw)
    error = json.loads(payload)["error"]
    assert status == 400 and message in error["message"] and error["type"] == "invalid_request_error"


def test_oversized_body_is_413_and_unknown_route_404(server):
    port, _, _ = server
    status, payload = request(port, "POST", "/v1/chat/completions", raw=b"x" * 200_000)
    assert status == 413 and "over 100000 bytes" in json.loads(payload)["error"]["message"]
    assert request(port, "GET", "/nope")[0] == 404


def test_concurrent_clients_each_get_their_own_answer(server):
    port, _, _ = server
    prompts = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(3)]
    expected = [chat(port, messages=p, max_tokens=10)[1]["choices"][0]["message"]["content"] for p in prompts]
    results = [None] * 3

    def ask(i):
        results[i] = chat(port, messages=prompts[i], max_tokens=10)[1]["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == expected


@pytest.mark.slow
def test_disconnect_mid_stream_stops_generation(server):
    port, state, _ = server
    counter = Counter()
    state.extra_options["logits_processors"] = [counter]
    try:
        body = json.dumps({"messages": HELLO, "max_tokens": 500, "stream": True}).encode()
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while received.count(b"data: ") < 4:
            received += client.recv(4096)
        [job] = running_jobs(state.worker)
        client.close()
        assert job.ended.wait(timeout=60)  # the worker let the job go
        assert counter.steps < 60 and job.generated < 60  # within a few tokens of the disconnect, not 500
        assert chat(port, messages=HELLO, max_tokens=3)[0] == 200  # and the server serves the next client
    finally:
        state.extra_options.clear()

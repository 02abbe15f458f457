"""The server with real clients (the official openai client, raw sockets) on 127.0.0.1: OpenAI details and safe defaults."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import mlx.core as mx
import openai
import pytest
from conftest import StepCounter, running_jobs

import mlx_gemma3
from mlx_gemma3.serve.http import ServerState, make_server
from mlx_gemma3.serve.requests import to_gemma_messages

HELLO = [{"role": "user", "content": "Hello there!"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class Forcer:
    """A logits processor that makes the model say `ids`, then end its turn."""

    def __init__(self, ids: list[int]):
        self.ids, self.first = [*ids, 106], None

    def __call__(self, tokens, logits):
        self.first = tokens.size if self.first is None else self.first
        step = min(tokens.size - self.first, len(self.ids) - 1)
        return mx.where(mx.arange(logits.shape[-1]) == self.ids[step], 1e4, logits)


class Slow:
    """A logits processor that never lets the reply end, waits `pause` s a step (after `gate`, if given) and counts."""

    def __init__(self, pause: float = 0.0, gate: threading.Event | None = None):
        self.pause, self.gate, self.steps, self.entered = pause, gate, 0, threading.Event()

    def __call__(self, tokens, logits):
        self.steps += 1
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        time.sleep(self.pause)
        ends = (mx.arange(logits.shape[-1]) == 1) | (mx.arange(logits.shape[-1]) == 106)
        return mx.where(ends, -1e9, logits)


@pytest.fixture(scope="module")
def loaded(tiny_chat_model):
    return mlx_gemma3.load(tiny_chat_model[0])


def serving(loaded, **policy):
    model, processor = loaded
    state = ServerState(model, processor, "tiny", max_tokens_limit=600, max_body_bytes=100_000, **policy)
    httpd = make_server(state, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, state


@pytest.fixture(scope="module")
def server(loaded):
    httpd, state = serving(loaded)
    yield httpd.server_address[1], state
    httpd.shutdown()
    httpd.server_close()


def client(port: int, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)


def raw(port: int, body: bytes, headers: dict, path: str = "/v1/chat/completions"):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.putrequest("POST", path, skip_host="Host" in headers, skip_accept_encoding=True)
    for name, value in headers.items():
        connection.putheader(name, value)
    connection.endheaders(body)
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, payload, response


def forced(state, text: str):
    state.extra_options["logits_processors"] = [Forcer(state.processor.tokenizer.encode(text, add_bos=False))]


def test_openai_client_chat_streamed_and_not_with_usage(server):
    port, _ = server
    whole = client(port).chat.completions.create(model="tiny", messages=HELLO, max_completion_tokens=10)
    chunks = list(
        client(port).chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.prompt_tokens_details.cached_tokens == 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_streamed_tool_calls(server):
    port, state = server
    forced(state, '[get_weather(city="Seoul")]')
    try:
        chunks = list(
            client(port).chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Weather in Seoul?"}],
                tools=[WEATHER],
                stream=True,
                max_tokens=60,
            )
        )
    finally:
        state.extra_options.clear()
    calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"] and calls[0].id.startswith("call_")
    assert json.loads(calls[0].function.arguments) == {"city": "Seoul"} and calls[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_streamed_text_with_tools_given_but_no_call(server):
    port, state = server
    forced(state, "It is sunny")
    try:
        chunks = list(
            client(port).chat.completions.create(
                model="tiny", messages=HELLO, tools=[WEATHER], stream=True, max_tokens=30, logprobs=True
            )
        )
    finally:
        state.extra_options.clear()
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "It is sunny"
    tokens = [e.token for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert "".join(tokens) == "It is sunny"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_streamed_and_not(server):
    port, _ = server
    whole = client(port).chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=6, logprobs=True, top_logprobs=3
    )
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens - (whole.choices[0].finish_reason == "stop")
    assert "".join(e.token for e in entries) == whole.choices[0].message.content
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    chunks = client(port).chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=6, logprobs=True, stream=True
    )
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]


def test_developer_role_is_a_system_turn(server):
    port, _ = server
    asked = lambda role: client(port).chat.completions.create(  # noqa: E731
        model="tiny", messages=[{"role": role, "content": "Be brief."}, *HELLO], max_tokens=4
    )
    developer, system = asked("developer"), asked("system")
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens
    assert developer.choices[0].message.content == system.choices[0].message.content


def test_tool_result_is_named_by_its_calls_function():
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
    ]
    turn = to_gemma_messages(messages)[-1]
    assert turn["role"] == "user" and '"name": "get_weather"' in turn["content"] and "call_1" not in turn["content"]


BAD = [
    ({"stream": "no"}, "'stream' must be true or false"),
    ({"n": 2}, "'n' must be 1"),
    ({"response_format": {"type": "xml"}}, "'response_format' must be"),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "r", "schema": {"type": "object", "if": {}, "then": {}}},
            }
        },
        'Unimplemented keys: ["if", "then"]',
    ),
    ({"response_format": {"type": "json_object"}, "tools": [WEATHER]}, "'response_format' and 'tools'"),
    ({"presence_penalty": 0.5}, "'presence_penalty' is not supported"),
    ({"max_tokens": 100000}, "'max_tokens' must lie in"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "differ"),
    ({"top_logprobs": 2}, "needs 'logprobs'"),
    ({"temperature": "hot"}, "'temperature' must be a number"),
    ({"tool_choice": "required"}, "has no 'tools'"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "'nope', which is not"),
    ({"tool_choice": "always", "tools": [WEATHER]}, "'tool_choice' must be"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
        "local image paths are refused",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]}
            ]
        },
        "reads text only",
    ),
    ({"stream_options": {"include_usage": "yes"}}, "'include_usage' must be true or false"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra,message", BAD)
def test_every_error_is_a_4xx_before_any_stream(server, extra, message, stream):
    port, _ = server
    body = {"messages": HELLO, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as error:
        client(port).chat.completions.create(
            model="tiny", messages=body.pop("messages"), stream=stream, extra_body=body
        )
    assert error.value.status_code == 400 and message in error.value.body["message"], error.value.body


@pytest.mark.slow
def test_host_content_type_chunked_and_timeout_refusals(loaded):
    httpd, _ = serving(loaded, request_timeout=0.5)
    port = httpd.server_address[1]
    try:
        body = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
        json_headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        assert raw(port, body, {**json_headers, "Host": "evil.example"})[0] == 403
        assert raw(port, body, {**json_headers, "Host": "localhost:1"})[0] == 200
        assert raw(port, body, {**json_headers, "Content-Type": "text/plain"})[0] == 415
        assert raw(port, b"a=1", {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "3"})[0] == 415
        status, _, response = raw(
            port, b"0\r\n\r\n", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        )
        assert status == 411 and response.getheader("Connection") == "close"
        assert raw(port, body, json_headers)[2].getheader("Access-Control-Allow-Origin") is None
        started = time.perf_counter()
        status, _, _ = raw(port, body[:10], {**json_headers})  # promises more than it sends
        assert status == 408 and time.perf_counter() - started < 5
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_api_key_and_cors_origin(loaded):
    httpd, _ = serving(loaded, api_key="sesame", cors_origin="http://app.example")
    port = httpd.server_address[1]
    try:
        with pytest.raises(openai.AuthenticationError):
            client(port, "wrong").chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
        reply = client(port, "sesame").chat.completions.with_raw_response.create(
            model="tiny", messages=HELLO, max_tokens=2
        )
        assert reply.headers["access-control-allow-origin"] == "http://app.example"
        assert reply.parse().choices[0].message.role == "assistant"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.slow
def test_a_full_queue_answers_503(loaded):
    httpd, state = serving(loaded, max_queue=1)
    port, gate = httpd.server_address[1], threading.Event()
    slow = Slow(gate=gate)
    state.extra_options["logits_processors"] = [slow]
    results = []
    ask = lambda: results.append(client(port).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2))  # noqa: E731
    threads = [threading.Thread(target=ask) for _ in range(2)]
    try:
        threads[0].start()
        assert slow.entered.wait(30)  # the first generates (held at its first step)
        threads[1].start()
        deadline = time.time() + 10
        while state.worker.jobs.qsize() < 1 and time.time() < deadline:
            time.sleep(0.01)  # the second waits in the queue
        with pytest.raises(openai.APIStatusError) as error:
            client(port).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
        assert error.value.status_code == 503 and error.value.response.headers["retry-after"] == "1"
    finally:
        gate.set()
        for t in threads:
            t.join(timeout=60)
        httpd.shutdown()
        httpd.server_close()
    assert len(results) == 2


@pytest.mark.slow
def test_an_abandoned_non_streaming_request_stops_generating(server):
    port, state = server
    slow, counter = Slow(pause=0.02), StepCounter(wake_at=5)
    state.extra_options["logits_processors"] = [slow, counter]
    try:
        body = json.dumps({"messages": HELLO, "max_tokens": 500}).encode()
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert counter.reached.wait(timeout=30)  # decoding, in the batch
        [job] = running_jobs(state.worker)
        connection.close()
        assert job.ended.wait(timeout=60)  # the worker let the job go
        assert job.generated < 60  # about 25 tokens run every 0.5 s: it stopped soon, not after 500
    finally:
        state.extra_options.clear()
    assert client(port).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices


@pytest.mark.slow
def test_server_process_with_an_api_key_and_allowed_image_dir(tiny_chat_model, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_gemma3.server",
            "--model",
            str(tiny_chat_model[0]),
            "--port",
            "0",
            "--api-key",
            "sesame",
            "--allowed-image-dir",
            str(tmp_path),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stderr.readline()
        assert line.startswith("serving"), line
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        reply = client(port, "sesame").chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)
        assert reply.choices[0].message.role == "assistant"
        image = [{"type": "image_url", "image_url": {"url": str(tmp_path / "red.png")}}]
        with pytest.raises(openai.BadRequestError, match="reads text only"):  # the path passed; the model is text-only
            client(port, "sesame").chat.completions.create(model="tiny", messages=[{"role": "user", "content": image}])
        with pytest.raises(openai.BadRequestError, match="outside the allowed"):
            outside = [{"type": "image_url", "image_url": {"url": "/etc/hostname"}}]
            client(port, "sesame").chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": outside}]
            )
        with pytest.raises(openai.AuthenticationError):
            client(port).models.list()
    finally:
        process.terminate()
        log = process.communicate(timeout=30)[1]
    assert "POST /v1/chat/completions 200" in log and "first token" in log and "prompt +" in log


def test_an_invalid_port_is_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "mlx_gemma3.server", "--port", "99999"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--port must be" in result.stderr


@pytest.mark.parametrize("stream", [False, True])
def test_completions_refuse_what_they_do_not_do(server, stream):
    port, _ = server
    with pytest.raises(openai.BadRequestError, match="unsupported field"):
        client(port).completions.create(model="tiny", prompt="Once upon", max_tokens=3, logprobs=2, stream=stream)
    reply = client(port).completions.create(model="tiny", prompt="Once upon", max_tokens=3)
    assert reply.choices[0].text is not None and reply.usage.completion_tokens >= 1


class CountingDraft:
    """The target as its own draft, counting its forwards (so the test sees the server really drafted)."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, 0

    def make_cache(self, *args, **kwargs):
        return self.model.make_cache(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("speculative", ["prompt_lookup", "draft_model"])
def test_speculative_decoding_serves_the_same_replies(loaded, speculative):
    """--prompt-lookup / --draft-model on the server: greedy replies identical to the plain server's."""
    draft = CountingDraft(loaded[0])
    extra = {"prompt_lookup": 3} if speculative == "prompt_lookup" else {"draft_model": draft, "num_draft_tokens": 2}
    messages = [{"role": "user", "content": "Say hello and then say hello again, hello hello."}]
    replies = []
    for options in ({}, extra):
        httpd, _ = serving(loaded, extra_options=dict(options))
        try:
            reply = client(httpd.server_address[1]).chat.completions.create(
                model="tiny", messages=messages, max_tokens=40
            )
            replies.append(reply.choices[0].message.content)
        finally:
            httpd.shutdown()
            httpd.server_close()
    assert replies[0] == replies[1] and replies[0]
    assert (draft.calls > 0) == (speculative == "draft_model")


def test_an_error_after_an_earlier_request_on_the_same_connection_is_a_clean_4xx(server):
    """Browsers and the openai client keep connections alive: a 400 on the second request is still a whole reply."""
    port, _ = server
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/v1/models")
    first = connection.getresponse()
    assert first.status == 200 and json.loads(first.read())["data"]
    body = json.dumps({"messages": HELLO, "max_tokens": 100000, "stream": True})
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    second = connection.getresponse()
    assert second.status == 400 and "'max_tokens' must lie in" in json.loads(second.read())["error"]["message"]
    connection.close()

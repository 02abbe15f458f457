"""The OpenAI-compatible HTTP server (standard library only): requests, replies, one generation at a time."""

from __future__ import annotations

import base64
import binascii
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


from ..errors import Gemma3Error
from ..generation.stream import stream_generate
from ..generation.streams import release_thread_streams
from ..processing.tools import ToolCall, as_tool, parse_tool_calls, tool_results_text, with_tools

MAX_BODY_BYTES = 20 * 2**20
MAX_TOKENS_LIMIT = 4096


class RequestError(Exception):
    """A client mistake: becomes an OpenAI-style error body with this HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class ServerState:
    """The loaded model and the lock that makes generations take turns (caches are never interleaved)."""

    model: object
    processor: object
    model_id: str
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    max_body_bytes: int = MAX_BODY_BYTES
    extra_options: dict = field(default_factory=dict)  # e.g. logits_processors, for embedding apps and tests
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_server(state: ServerState, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    handler = type("Handler", (Handler,), {"state": state})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


class Handler(BaseHTTPRequestHandler):
    state: ServerState
    protocol_version = "HTTP/1.1"

    def finish(self):
        super().finish()
        release_thread_streams()  # each request runs in its own thread; MLX needs it to drop its streams

    def log_message(self, format, *args):  # one quiet line per request on stderr
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def do_GET(self):
        if self.path == "/health":
            self.send_json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            model = {"id": self.state.model_id, "object": "model", "created": 0, "owned_by": "mlx_gemma3"}
            self.send_json(200, {"object": "list", "data": [model]})
        else:
            self.send_error_json(RequestError(f"no route GET {self.path}", 404))

    def do_POST(self):
        routes = {"/v1/chat/completions": self.chat_completions, "/v1/completions": self.completions}
        try:
            if self.path not in routes:
                raise RequestError(f"no route POST {self.path}", 404)
            routes[self.path](self.read_json())
        except RequestError as e:
            self.send_error_json(e)
        except Gemma3Error as e:
            self.send_error_json(RequestError(str(e)))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; its generation was closed with the stream

    def read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("a JSON body with Content-Length is required", 411)
        if int(length) > self.state.max_body_bytes:
            self.close_connection = True
            raise RequestError(f"request body over {self.state.max_body_bytes} bytes", 413)
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    def chat_completions(self, body: dict) -> None:
        tools = [as_tool(t) for t in body.get("tools") or []] if body.get("tool_choice") != "none" else []
        messages = to_gemma_messages(required(body, "messages", list))
        if tools:
            messages = with_tools(messages, tools)
        self.respond(body, messages, chat=True, tools=bool(tools))

    def completions(self, body: dict) -> None:
        prompt = required(body, "prompt", str)
        self.respond(body, prompt, chat=False, tools=False)

    def respond(self, body: dict, prompt, chat: bool, tools: bool) -> None:
        options = generation_options(body, self.state.max_tokens_limit)
        if not chat:
            options["use_chat_template"] = False
        stops = stop_strings(body)
        reply_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        with self.state.lock:
            responses = stream_generate(self.state.model, self.state.processor, prompt, **options, **self.state.extra_options)
            try:
                if body.get("stream"):
                    self.stream_reply(reply_id, responses, stops, chat)
                else:
                    text, finish, usage = collect(responses, stops)
                    self.send_json(200, completion_body(reply_id, self.state.model_id, text, finish, usage, chat, tools))
            finally:
                responses.close()

    def stream_reply(self, reply_id: str, responses, stops: list[str], chat: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if chat:
            self.send_event(chunk_body(reply_id, self.state.model_id, {"role": "assistant", "content": ""}, None, chat))
        for text, finish in stream_with_stops(responses, stops):
            delta = {"content": text} if chat else text
            self.send_event(chunk_body(reply_id, self.state.model_id, delta, finish, chat))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def send_event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, error: RequestError) -> None:
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        self.send_json(error.status, {"error": {"message": str(error), "type": kind, "param": error.param, "code": None}})


def required(body: dict, key: str, kind: type):
    value = body.get(key)
    if not isinstance(value, kind) or not value:
        raise RequestError(f"'{key}' must be a non-empty {kind.__name__}", param=key)
    return value


def number(body: dict, key: str, default, low, high, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"'{key}' must be a number", param=key)
    if not low <= value <= high:
        raise RequestError(f"'{key}' must lie in [{low}, {high}], got {value}", param=key)
    return kind(value)


def generation_options(body: dict, limit: int) -> dict:
    return {
        "max_tokens": number(body, "max_tokens", min(512, limit), 1, limit, int),
        "temp": number(body, "temperature", 0.0, 0.0, 2.0),
        "top_p": number(body, "top_p", 1.0, 1e-9, 1.0),
        "seed": number(body, "seed", None, 0, 2**32 - 1, int),
    }


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError("'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    return stops


def to_gemma_messages(messages: list) -> list[dict]:
    """OpenAI chat messages → ours: images from data URLs or paths, tool calls and tool results as text turns."""
    out: list[dict] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role'", param="messages")
        role = message["role"]
        if role == "tool":
            text = tool_results_text([_named(message)], [message.get("content")])
            _append(out, "user", text)
        elif role == "assistant" and message.get("tool_calls"):
            _append(out, "assistant", "[" + ", ".join(_call_text(c) for c in message["tool_calls"]) + "]")
        elif role in ("system", "user", "assistant"):
            _append(out, role, _content(message.get("content"), i))
        else:
            raise RequestError(f"messages[{i}] has role {role!r}: use system, user, assistant or tool", param="messages")
    return out


def _append(out: list[dict], role: str, content) -> None:
    """Consecutive turns of one role (several tool results, say) merge into one, as Gemma's roles alternate."""
    if out and out[-1]["role"] == role and role != "system":
        previous = out[-1]["content"]
        as_items = lambda c: c if isinstance(c, list) else [{"type": "text", "text": c}]  # noqa: E731
        out[-1]["content"] = previous + "\n" + content if isinstance(previous, str) and isinstance(content, str) \
            else [*as_items(previous), *as_items(content)]
    else:
        out.append({"role": role, "content": content})


def _named(message: dict) -> ToolCall:
    return ToolCall(str(message.get("name") or message.get("tool_call_id") or "tool"), {})


def _call_text(call: dict) -> str:
    function = call.get("function") or {}
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except json.JSONDecodeError:
        raise RequestError("tool_calls arguments must be a JSON object string", param="messages") from None
    return f"{function.get('name')}(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")"


def _content(content, i: int):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"messages[{i}].content must be a string or a list of parts", param="messages")
    items = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            items.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else part.get("image_url")
            items.append({"type": "image", "image": _image_source(url, i)})
        else:
            raise RequestError(f"messages[{i}]: content parts must be 'text' or 'image_url'", param="messages")
    return items


def _image_source(url, i: int):
    if not isinstance(url, str) or not url:
        raise RequestError(f"messages[{i}]: image_url needs a url", param="messages")
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.split(",", 1)[1], validate=True)
        except (IndexError, binascii.Error):
            raise RequestError(f"messages[{i}]: the image data URL is not valid base64", param="messages") from None
    if url.startswith(("http://", "https://")):
        raise RequestError(f"messages[{i}]: remote image URLs are not fetched; send a data URL or a local path")
    return str(Path(url.removeprefix("file://")))


def stream_with_stops(responses, stops: list[str]):
    """(text, finish reason or None) pieces; a stop string ends the reply unsent, and text that could begin one
    is held back until it cannot."""
    held = ""
    for response in responses:
        held += response.text
        cut = min((held.find(s) for s in stops if s in held), default=-1)
        if cut >= 0:
            yield held[:cut], "stop"
            return
        partial = max((k for s in stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        out, held = held[: len(held) - partial], held[len(held) - partial :]
        if response.finish_reason:
            yield out + held, response.finish_reason
            return
        if out:
            yield out, None


def collect(responses, stops: list[str]) -> tuple[str, str, dict]:
    text, finish, last = [], "length", None
    counted = []
    for piece, reason in stream_with_stops(_counting(responses, counted), stops):
        text.append(piece)
        finish = reason or finish
    last = counted[-1] if counted else None
    usage = {"prompt_tokens": last.prompt_tokens if last else 0, "completion_tokens": len(counted)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return "".join(text), finish, usage


def _counting(responses, seen: list):
    for response in responses:
        seen.append(response)
        yield response


def completion_body(reply_id, model_id, text, finish, usage, chat: bool, tools: bool) -> dict:
    created = int(time.time())
    if not chat:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {"id": reply_id, "object": "text_completion", "created": created, "model": model_id,
                "choices": [choice], "usage": usage}
    message = {"role": "assistant", "content": text}
    calls = parse_tool_calls(text) if tools else []
    if calls:
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for c in calls
        ]}
        finish = "tool_calls"
    return {"id": reply_id, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage}


def chunk_body(reply_id, model_id, delta, finish, chat: bool) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish} if chat else {"index": 0, "text": delta, "finish_reason": finish}
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": reply_id, "object": kind, "created": int(time.time()), "model": model_id, "choices": [choice]}

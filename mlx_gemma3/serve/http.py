"""The OpenAI-compatible HTTP server (standard library only): checks, prepares, queues and replies to requests.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import hmac
import json
import select
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import chain
from pathlib import Path

from ..errors import Gemma3Error
from ..generation.step import PREFILL_STEP_SIZE
from ..generation.text_stream import TEXT_ONLY, Options, image_sources
from ..processing.image import process_images
from ..processing.prompt import is_base_model, prompt_ids
from ..processing.tools import parse_tool_calls
from .moderation import MODERATIONS_PATH, check_moderator, moderate, parse_moderation
from .page import page_file
from .prompt_cache import DEFAULT_BYTES, DEFAULT_ENTRIES, PromptCacheStore
from .requests import Request, RequestError, parse_chat, parse_completion
from .worker import MAX_BATCH, ClientGone, Job, QueueFull, Worker, distributable

MAX_BODY_BYTES = 20 * 2**20
MAX_TOKENS_LIMIT = 4096
MAX_QUEUE = 16
REQUEST_TIMEOUT = 60.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# The page runs only its own files, talks only to this server, and shows images only from data:/blob: URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@dataclass
class ServerState:
    """The loaded model and the server's policy; `worker` (made by make_server) runs the generations in turn."""

    model: object
    processor: object
    model_id: str
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    max_body_bytes: int = MAX_BODY_BYTES
    extra_options: dict = field(default_factory=dict)  # e.g. logits_processors, for embedding apps and tests
    image_dirs: tuple[Path, ...] = ()  # folders local image paths may name; none: only data URLs
    api_key: str | None = None
    cors_origin: str | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback names and the bound address
    max_queue: int = MAX_QUEUE
    request_timeout: float = REQUEST_TIMEOUT
    prompt_cache_size: int = DEFAULT_ENTRIES  # KV caches kept across requests (0: no prompt cache)
    prompt_cache_bytes: int = DEFAULT_BYTES  # their bytes together (0: no prompt cache)
    max_batch: int = MAX_BATCH  # requests decoded together
    prefill_step_size: int = PREFILL_STEP_SIZE  # prompt tokens prefilled per iteration of the worker's loop
    web: bool = True  # serve the chat page at GET /
    mirror: object = None  # distributed: rank 0's link to the other ranks (distributed/serving.py Leader)
    worker: Worker | None = None


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_close(self):
        super().server_close()
        self.RequestHandlerClass.state.worker.stop()


def make_server(state: ServerState, host: str = "127.0.0.1", port: int = 8080) -> Server:
    state.image_dirs = tuple(Path(d).resolve() for d in state.image_dirs)
    state.allowed_hosts = (*LOOPBACK_NAMES, *state.allowed_hosts, host.lower(), f"[{host.lower()}]")
    handler = type("Handler", (Handler,), {"state": state, "timeout": state.request_timeout})
    server = Server((host, port), handler)
    store = PromptCacheStore(state.prompt_cache_size, state.prompt_cache_bytes)
    state.worker = Worker(
        state.model,
        state.processor,
        state.max_queue,
        store,
        state.max_batch,
        state.mirror,
        prefill_step_size=state.prefill_step_size,
    )
    return server


class Handler(BaseHTTPRequestHandler):
    state: ServerState
    protocol_version = "HTTP/1.1"

    def handle_one_request(self):
        # A kept-alive connection carries several requests, each with its own state (setup() runs once per connection).
        self.status, self.body_read, self.sent_headers, self.job = 0, False, False, None
        super().handle_one_request()

    def log_request(self, code="-", size="-"):  # the request's own line (with timings) is written when it ends
        self.status = code

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def log_timings(self, started: float, usage: dict | None = None) -> None:
        parts = [f"{self.command} {self.path} {self.status}", f"total {time.perf_counter() - started:.2f}s"]
        job = self.job
        if job is not None and job.started_at is not None:
            parts.append(f"queued {job.started_at - job.queued_at:.2f}s")
            if job.first_token_at is not None:
                parts.append(f"first token {job.first_token_at - job.started_at:.2f}s")
        if usage:
            parts.append(f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} generated tokens")
        elif job is not None and job.started_at is not None:
            parts.append(f"stopped after {job.generated} generated tokens")
        if job is not None and job.batch_peak:
            parts.append(f"batch of up to {job.batch_peak}")
        self.log_message("%s", ", ".join(parts))

    def end_headers(self):
        if self.state.cors_origin:
            self.send_header("Access-Control-Allow-Origin", self.state.cors_origin)
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.sent_headers = True
        super().end_headers()

    def do_OPTIONS(self):
        self.body_read = True
        if self.state.cors_origin:
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error_json(RequestError("cross-origin requests are off (start with --cors-origin)", 405))

    def do_GET(self):
        started, self.body_read = time.perf_counter(), True
        try:
            page = page_file(self.path) if self.state.web else None
            self.check_access(key_needed=page is None)
            if page is not None:
                self.send_page_file(*page)
            elif self.path == "/health":
                self.send_json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                model = {
                    "id": self.state.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "mlx_gemma3",
                    "vision": self.state.model.config.vision is not None,
                    "base_model": is_base_model(self.state.processor),  # no chat template: it continues text
                }
                self.send_json(200, {"object": "list", "data": [model]})
            else:
                off = "" if self.state.web else " (the chat page is off: --no-web)"
                raise RequestError(f"no route GET {self.path}{off}", 404)
        except RequestError as e:
            self.send_error_json(e)
        self.log_timings(started)

    def do_POST(self):
        started, usage = time.perf_counter(), None
        try:
            usage = self.post()
        except RequestError as e:
            self.reply_error(e)
        except Gemma3Error as e:
            self.reply_error(RequestError(str(e)))
        except (ClientGone, ConnectionError, TimeoutError):
            self.status = "client gone"
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 — one failed request must not leave its client without an answer
            self.reply_error(RequestError(f"internal error: {type(e).__name__}: {e}", 500))
        finally:
            if self.job is not None:
                self.job.cancelled.set()
                if self.job.started_at is not None:  # a cancelled job leaves at the worker's next step
                    self.job.ended.wait(timeout=5)
        self.log_timings(started, usage)

    def post(self) -> dict | None:
        if self.path == MODERATIONS_PATH:
            return self.moderate()
        parse = {"/v1/chat/completions": self.parse_chat, "/v1/completions": self.parse_completion}.get(self.path)
        self.check_access()
        if parse is None:
            raise RequestError(f"no route POST {self.path}", 404)
        request = parse(self.read_json())
        self.job = self.prepare(request)
        try:
            self.state.worker.submit(self.job)
        except QueueFull:
            raise RequestError(
                "the server is busy: too many requests waiting", 503, headers={"Retry-After": "1"}
            ) from None
        steps = self.job.steps(self.client_gone)
        return self.stream_reply(request, steps) if request.stream else self.whole_reply(request, steps)

    def moderate(self) -> None:
        """ShieldGemma 2 scores for the request's images, computed on the worker's thread (one call)."""
        self.check_access()
        state = self.state
        check_moderator(state.model)
        if state.mirror is not None:
            raise RequestError(
                "moderation does not run on a distributed server (--distributed): serve ShieldGemma 2 from one process"
            )
        request = parse_moderation(self.read_json(), state.image_dirs)
        try:
            body = state.worker.call(lambda: moderate(state.model, state.processor, request, state.model_id))
        except QueueFull:
            raise RequestError(
                "the server is busy: too many requests waiting", 503, headers={"Retry-After": "1"}
            ) from None
        self.send_json(200, body)

    def parse_chat(self, body: dict) -> Request:
        return parse_chat(body, self.state.max_tokens_limit, self.state.image_dirs)

    def parse_completion(self, body: dict) -> Request:
        return parse_completion(body, self.state.max_tokens_limit)

    def check_access(self, key_needed: bool = True) -> None:
        """The Host guard for every request; the API key for all but /health and the page's own files."""
        if host_name(self.headers.get("Host", "")) not in self.state.allowed_hosts:
            raise RequestError("this Host is not served (only this machine's names: DNS rebinding guard)", 403)
        key = self.state.api_key
        if key and key_needed and self.path != "/health":
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                raise RequestError("a valid API key is required (Authorization: Bearer KEY)", 401)

    def read_json(self) -> dict:
        if self.headers.get_content_type() != "application/json":
            raise RequestError("the body must be JSON with Content-Type: application/json", 415)
        if self.headers.get("Transfer-Encoding"):
            raise RequestError("chunked request bodies are not supported: send Content-Length", 411)
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("a JSON body with Content-Length is required", 411)
        if int(length) > self.state.max_body_bytes:
            raise RequestError(f"request body over {self.state.max_body_bytes} bytes", 413)
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            raise RequestError("the request body did not arrive in time", 408) from None
        if len(raw) < int(length):
            raise ClientGone()
        self.body_read = True
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise RequestError("the body's JSON nests too deeply") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    def prepare(self, request: Request) -> Job:
        """Options checked, prompt rendered and tokenized, images loaded: every client mistake is found here."""
        state = self.state
        options = Options.of({**request.options, **state.extra_options})
        if state.mirror is not None and not distributable(options):
            raise RequestError(
                "a distributed server (--distributed) serves neither max_kv_size nor speculative decoding: "
                "serve them from one process"
            )
        sources = image_sources(request.prompt) if request.chat else []
        pixels, crops, vision = None, None, state.model.config.vision
        if sources:
            if vision is None:
                raise RequestError(TEXT_ONLY)
            pixels, crops = process_images(sources, vision.image_size, options.pan_and_scan)
        ids = prompt_ids(
            state.processor,
            request.prompt,
            options.system,
            options.use_chat_template,
            crops,
            vision.tokens_per_image if sources else None,
        )
        context = state.model.config.text.max_position_embeddings
        if len(ids) >= context:
            raise RequestError(f"the prompt is {len(ids)} tokens; the model's context is {context}: shorten it")
        return Job(ids, pixels, options, request.top_logprobs if request.logprobs else None)

    def client_gone(self) -> bool:
        """Whether the client closed its connection (checked between tokens, without consuming anything)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def whole_reply(self, request: Request, steps) -> dict:
        tally = Tally()
        pieces = list(stream_with_stops(tally.count(steps), request.stops))
        text, finish = "".join(p[0] for p in pieces), pieces[-1][1] if pieces else "length"
        logprobs = [entry for p in pieces for entry in p[2]] if request.logprobs else None
        reply_id = new_id(request.chat)
        body = (chat_body if request.chat else completion_body)(
            reply_id, self.state.model_id, text, finish or "length", tally.usage(), request.tools, logprobs
        )
        self.send_json(200, body)
        return tally.usage()

    def stream_reply(self, request: Request, steps) -> dict:
        tally, reply_id, model_id = Tally(), new_id(request.chat), self.state.model_id
        pieces = stream_with_stops(tally.count(steps), request.stops)
        first = next(pieces, None)  # errors of the generation's start still become a 4xx, not a broken stream
        self.send_stream_headers()
        chunk = lambda delta, finish=None, logprobs=None: self.send_event(  # noqa: E731
            chunk_body(reply_id, model_id, delta, finish, request, logprobs)
        )
        if request.chat:
            chunk({"role": "assistant", "content": ""})
        rest = chain([first] if first else [], pieces)
        if request.tools:
            self.send_buffered_tool_reply(list(rest), chunk, request.logprobs)
        else:
            for text, finish, entries in rest:
                chunk({"content": text} if request.chat else text, finish, entries if request.logprobs else None)
        if request.include_usage:
            self.send_event(
                {
                    "id": reply_id,
                    "object": chunk_kind(request.chat),
                    "created": int(time.time()),
                    "model": model_id,
                    "choices": [],
                    "usage": tally.usage(),
                }
            )
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        return tally.usage()

    def send_buffered_tool_reply(self, pieces: list, chunk, logprobs: bool) -> None:
        """With tools, the reply is buffered: tool_calls deltas when it parses as calls, else its text."""
        text, finish = "".join(p[0] for p in pieces), (pieces[-1][1] if pieces else None) or "length"
        calls = parse_tool_calls(text)
        if calls:
            deltas = [{"index": i, **call} for i, call in enumerate(tool_calls_json(calls))]
            chunk({"tool_calls": deltas})
            chunk({}, "tool_calls")
        else:
            chunk({"content": text}, finish, [e for p in pieces for e in p[2]] if logprobs else None)

    def send_stream_headers(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def send_event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def send_page_file(self, data: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in PAGE_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a garbled request line, headers too long...) as OpenAI-style JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # what http.server assumes of a request line it cannot read
            self.request_version = "HTTP/1.0"  # so the reply has a status line and headers
        self.send_error_json(RequestError(message or HTTPStatus(code).phrase, code))

    def send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if not self.body_read:  # the unread body would be taken for the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def reply_error(self, error: RequestError) -> None:
        if not self.sent_headers:
            self.send_error_json(error)
            return
        try:  # mid-stream (after its first token): the error is the stream's last event
            self.send_event({"error": error_json(error)})
        except OSError:
            pass
        self.close_connection = True

    def send_error_json(self, error: RequestError) -> None:
        self.send_json(error.status, {"error": error_json(error)}, error.headers)


def host_name(host: str) -> str:
    """The name in a Host header, without its port: 'localhost:8080' → 'localhost', '[::1]:80' → '[::1]'."""
    host = host.strip().lower()
    return host[: host.find("]") + 1] if host.startswith("[") else host.split(":")[0]


def error_json(error: RequestError) -> dict:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"message": str(error), "type": kind, "param": error.param, "code": None}


class Tally:
    """Counts the steps of a reply for its usage."""

    def __init__(self):
        self.completion_tokens, self.prompt_tokens, self.reused_tokens = 0, 0, 0

    def count(self, steps):
        for step in steps:
            self.completion_tokens += 1
            self.prompt_tokens, self.reused_tokens = step.prompt_tokens, step.reused_tokens
            yield step

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.reused_tokens},
        }


def stream_with_stops(steps, stops: list[str]):
    """(text, finish reason or None, logprob entries) pieces; a stop string ends the reply unsent, and text that
    could begin one is held back until it cannot."""
    held, entries = "", []
    for step in steps:
        held += step.text
        entries += [step.logprob] if step.logprob else []
        cut = min((held.find(s) for s in stops if s in held), default=-1)
        if cut >= 0:
            yield held[:cut], "stop", entries
            return
        partial = max((k for s in stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        out, held = held[: len(held) - partial], held[len(held) - partial :]
        if step.finish:
            yield out + held, step.finish, entries
            return
        if out:
            yield out, None, entries
            entries = []


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def tool_calls_json(calls) -> list[dict]:
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:12]}",
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        for c in calls
    ]


def chat_body(reply_id, model_id, text, finish, usage, tools: bool, logprobs) -> dict:
    message = {"role": "assistant", "content": text}
    calls = parse_tool_calls(text) if tools else []
    if calls:
        message, finish = {"role": "assistant", "content": None, "tool_calls": tool_calls_json(calls)}, "tool_calls"
    choice = {
        "index": 0,
        "message": message,
        "finish_reason": finish,
        "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
    }
    return {
        "id": reply_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [choice],
        "usage": usage,
    }


def completion_body(reply_id, model_id, text, finish, usage, tools: bool, logprobs) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {
        "id": reply_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [choice],
        "usage": usage,
    }


def chunk_kind(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"


def chunk_body(reply_id, model_id, delta, finish, request: Request, logprobs=None) -> dict:
    if request.chat:
        choice = {
            "index": 0,
            "delta": delta,
            "finish_reason": finish,
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
        }
    else:
        choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
    body = {
        "id": reply_id,
        "object": chunk_kind(request.chat),
        "created": int(time.time()),
        "model": model_id,
        "choices": [choice],
    }
    return {**body, "usage": None} if request.include_usage else body

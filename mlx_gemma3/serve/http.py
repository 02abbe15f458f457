"""The HTTP server (standard library only): routes, access checks, request bodies, the models' lookup, the reply's
transport (JSON or server-sent events) and errors in each endpoint's own shape. The protocols live beside it:
openai_chat.py, responses.py, anthropic.py, moderation.py.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import hmac
import json
import select
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import chain
from pathlib import Path

from ..errors import Gemma3Error
from ..generation.text_stream import TEXT_ONLY, Options, image_sources
from ..processing.image import process_images
from ..processing.prompt import prompt_ids
from .anthropic import COUNT_TOKENS_PATH, MESSAGES_PATH, count_tokens, messages
from .anthropic import error_body as anthropic_error
from .embeddings import EMBEDDINGS_PATH, embeddings
from .moderation import MODERATIONS_PATH, check_moderator, moderate, parse_moderation
from .openai_chat import CHAT_PATH, COMPLETIONS_PATH, chat, completion
from .page import page_file
from .prompt_cache import DEFAULT_BYTES, DEFAULT_ENTRIES, PromptCacheStore
from .registry import ModelSpec, Registry, Served, UnknownModel
from .reply import Ending, reply_events
from .requests import Request, RequestError, openai_error
from .responses import RESPONSES_PATH, STORED_RESPONSES, ResponseStore, create, delete, retrieve
from .worker import MAX_BATCH, ClientGone, Job, QueueFull, Worker, batchable

MAX_BODY_BYTES = 20 * 2**20
MAX_TOKENS_LIMIT = 4096
MAX_QUEUE = 16
REQUEST_TIMEOUT = 60.0
MAX_LOADED_MODELS = 4  # as llama-server's router (--models-max)
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
    """The models and the server's policy. Either one loaded model (`model`, `processor`, `model_id`) or `models`
    (specs) with `load_model` (spec → (model, processor)) to load them on first use; make_server makes the
    `registry` (each loaded model with its worker) and `worker` is the first model's."""

    model: object = None
    processor: object = None
    model_id: str = "model"
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    max_body_bytes: int = MAX_BODY_BYTES
    extra_options: dict = field(default_factory=dict)  # e.g. logits_processors, for embedding apps and tests
    chat_template_args: dict = field(default_factory=dict)  # template variables for every chat request (it may add)
    image_dirs: tuple[Path, ...] = ()  # folders local image paths may name; none: only data URLs
    api_key: str | None = None
    cors_origin: str | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback names and the bound address
    max_queue: int = MAX_QUEUE
    request_timeout: float = REQUEST_TIMEOUT
    prompt_cache_size: int = DEFAULT_ENTRIES  # KV caches kept across requests, per model (0: no prompt cache)
    prompt_cache_bytes: int = DEFAULT_BYTES  # their bytes together (0: no prompt cache)
    max_batch: int = MAX_BATCH  # requests decoded together
    web: bool = True  # serve the chat page at GET /
    mirror: object = None  # distributed: rank 0's link to the other ranks (distributed/serving.py Leader)
    models: list[ModelSpec] = field(default_factory=list)
    load_model: Callable | None = None
    max_loaded_models: int = MAX_LOADED_MODELS  # 0: no bound
    max_model_bytes: int = 0  # the loaded models' weights together (0: no bound)
    stored_responses: int = STORED_RESPONSES  # /v1/responses kept for previous_response_id and GET
    registry: Registry | None = None
    responses: ResponseStore | None = None
    worker: Worker | None = None


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_close(self):
        super().server_close()
        registry = self.RequestHandlerClass.state.registry
        if registry is not None:  # None when the port could not be bound
            registry.close()


def make_server(state: ServerState, host: str = "127.0.0.1", port: int = 8080) -> Server:
    """The server, its port bound (an OSError when it cannot be), its models registered (one loaded model, or
    the specs, none loaded yet: `state.registry.preload()` loads the first)."""
    state.image_dirs = tuple(Path(d).resolve() for d in state.image_dirs)
    state.allowed_hosts = (*LOOPBACK_NAMES, *state.allowed_hosts, host.lower(), f"[{host.lower()}]")
    handler = type("Handler", (Handler,), {"state": state, "timeout": state.request_timeout})
    server = Server((host, port), handler)

    def start(model, processor) -> Worker:
        store = PromptCacheStore(state.prompt_cache_size, state.prompt_cache_bytes)
        return Worker(model, processor, state.max_queue, store, state.max_batch, state.mirror)

    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    limits = (state.max_loaded_models, state.max_model_bytes)
    state.registry = Registry(state.models, state.load_model, start, *limits, log)
    if state.model is not None:
        state.worker = state.registry.add(ModelSpec(state.model_id, ""), state.model, state.processor).worker
    state.responses = ResponseStore(state.stored_responses)
    return server


# Each route: its handlers by method, and the shape of its errors. A path ending in "/" takes an id after it.
ROUTES = {
    "/health": ({"GET": lambda x: x.send_json(200, {"status": "ok"})}, openai_error),
    "/v1/models": ({"GET": lambda x: x.send_json(200, x.models_json())}, openai_error),
    CHAT_PATH: ({"POST": chat}, openai_error),
    COMPLETIONS_PATH: ({"POST": completion}, openai_error),
    MODERATIONS_PATH: ({"POST": lambda x: x.moderate()}, openai_error),
    EMBEDDINGS_PATH: ({"POST": embeddings}, openai_error),
    RESPONSES_PATH: ({"POST": create}, openai_error),
    RESPONSES_PATH + "/": ({"GET": retrieve, "DELETE": delete}, openai_error),
    MESSAGES_PATH: ({"POST": messages}, anthropic_error),
    COUNT_TOKENS_PATH: ({"POST": count_tokens}, anthropic_error),
}


def route(path: str) -> tuple[dict, Callable[[RequestError], dict], str | None]:
    """(handlers by method, error shape, the id after the route's "/" or None) for a URL path (query ignored);
    ({}, the OpenAI shape, None) when no route has it."""
    path = path.split("?", 1)[0]
    if path in ROUTES:
        return *ROUTES[path], None
    prefix, _, tail = path.rpartition("/")
    if tail and prefix + "/" in ROUTES:
        return *ROUTES[prefix + "/"], tail
    return {}, anthropic_error if path.startswith(MESSAGES_PATH) else openai_error, None


class Handler(BaseHTTPRequestHandler):
    state: ServerState
    protocol_version = "HTTP/1.1"

    def handle_one_request(self):
        # A kept-alive connection carries several requests, each with its own state (setup() runs once per connection).
        self.status, self.body_read, self.sent_headers, self.job, self.ending = 0, False, False, None, None
        self.stream, self.error_shape, self.path_id = None, openai_error, None
        super().handle_one_request()

    def log_request(self, code="-", size="-"):  # the request's own line (with timings) is written when it ends
        self.status = code

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def log_timings(self, started: float) -> None:
        parts = [f"{self.command} {self.path} {self.status}", f"total {time.perf_counter() - started:.2f}s"]
        job = self.job
        if job is not None and job.started_at is not None:
            parts.append(f"queued {job.started_at - job.queued_at:.2f}s")
            if job.first_token_at is not None:
                parts.append(f"first token {job.first_token_at - job.started_at:.2f}s")
        if self.ending is not None:
            usage = self.ending.usage
            parts.append(f"{usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens")
        elif job is not None and job.started_at is not None:
            parts.append(f"stopped after {job.generated} generated tokens")
        if job is not None and job.batch_peak:
            parts.append(f"batch of up to {job.batch_peak}")
        self.log_message("%s", ", ".join(parts))

    def end_headers(self):
        if self.state.cors_origin:
            self.send_header("Access-Control-Allow-Origin", self.state.cors_origin)
            self.send_header(
                "Access-Control-Allow-Headers", "Authorization, Content-Type, x-api-key, anthropic-version"
            )
            self.send_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
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
        page = page_file(self.path) if self.state.web else None
        if page is None:
            self.answer()
            return
        started, self.body_read = time.perf_counter(), True
        try:
            self.check_access(key_needed=False)
            self.send_page_file(*page)
        except RequestError as e:
            self.send_error_json(e)
        self.log_timings(started)

    def do_POST(self):
        self.answer()

    def do_DELETE(self):
        self.answer()

    def do_PUT(self):
        self.answer()

    def do_PATCH(self):
        self.answer()

    def answer(self) -> None:
        """Route the request to its handler; every failure becomes an error in the route's shape."""
        started = time.perf_counter()
        handlers, self.error_shape, self.path_id = route(self.path)
        try:
            with ExitStack() as self.held:  # the models this request uses, released when it ends
                self.check_access(key_needed=self.path != "/health")
                self.dispatch(handlers)
        except RequestError as e:
            self.reply_error(e)
        except Gemma3Error as e:
            self.reply_error(RequestError(str(e)))
        except (ClientGone, ConnectionError, TimeoutError):
            self.status = "client gone"
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 — one failed request must not leave its client without an answer
            self.reply_error(RequestError(f"internal error: {type(e).__name__}: {e}", 500))
        self.log_timings(started)

    def dispatch(self, handlers: dict) -> None:
        if self.command in handlers:
            handlers[self.command](self)
            return
        if self.command != "POST":
            self.body_read = True  # only a POST is taken to carry a body
        if not handlers and self.state.web and page_file(self.path) is not None:
            handlers = {"GET": None}  # the chat page's files
        if handlers:
            allowed = ", ".join(sorted(handlers))
            raise RequestError(
                f"{self.command} is not allowed on {self.path}: use {allowed}", 405, headers={"Allow": allowed}
            )
        off = "" if self.state.web or self.command != "GET" else " (the chat page is off: --no-web)"
        raise RequestError(f"no route {self.command} {self.path}{off}", 404)

    def check_access(self, key_needed: bool = True) -> None:
        """The Host guard for every request; the API key (Authorization: Bearer KEY, or x-api-key: KEY) for all but
        /health and the page's own files."""
        if host_name(self.headers.get("Host", "")) not in self.state.allowed_hosts:
            raise RequestError("this Host is not served (only this machine's names: DNS rebinding guard)", 403)
        key = self.state.api_key
        if key and key_needed:
            bearer = self.headers.get("Authorization", "")
            given = bearer.removeprefix("Bearer ") if bearer.startswith("Bearer ") else self.headers.get("x-api-key")
            if not hmac.compare_digest((given or "").encode(), key.encode()):
                raise RequestError("a valid API key is required (Authorization: Bearer KEY, or x-api-key: KEY)", 401)

    # What the protocols use (openai_chat.py, responses.py, anthropic.py).

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

    def served_model(self, name, kind: str = "chat") -> Served:
        """The model of `kind` (chat, embedding) a request's `model` field names, loaded if need be and held until
        the request ends; a 404 for a name no such model goes by."""
        if name is not None and not isinstance(name, str):
            raise RequestError("'model' must be a string", param="model")
        try:
            return self.held.enter_context(self.state.registry.use(name, kind))
        except UnknownModel as e:
            raise RequestError(str(e), 404, param="model", code="model_not_found") from None

    def prepare(self, served: Served, request: Request) -> Job:
        """Options checked, prompt rendered and tokenized, images loaded: every client mistake is found here."""
        state = self.state
        options = Options.of({**request.options, **served.options, **state.extra_options})
        if state.mirror is not None and not batchable(options):
            raise RequestError(
                "a distributed server (--distributed) decodes every request in its batch: "
                "max_kv_size and speculative decoding are not available on it"
            )
        sources = image_sources(request.prompt) if request.chat else []
        pixels, crops, vision = None, None, served.model.config.vision
        if sources:
            if vision is None:
                raise RequestError(TEXT_ONLY)
            pixels, crops = process_images(sources, vision.image_size, options.pan_and_scan)
        ids = prompt_ids(
            served.processor,
            request.prompt,
            options.system,
            options.use_chat_template,
            crops,
            vision.tokens_per_image if sources else None,
            options.tools,
            options.chat_template_kwargs,
        )
        context = served.model.config.text.max_position_embeddings
        if len(ids) >= context:
            raise RequestError(f"the prompt is {len(ids)} tokens; the model's context is {context}: shorten it")
        return Job(ids, pixels, options, request.top_logprobs if request.logprobs else None)

    def generate(self, served: Served, request: Request) -> Iterator:
        """The reply's events (reply.Delta, then its reply.Ending) as the model makes them."""
        self.job = self.prepare(served, request)
        self.held.callback(self.end_job)  # before the model is released: a model whose job runs is never unloaded
        try:
            served.worker.submit(self.job)
        except QueueFull:
            raise RequestError(
                "the server is busy: too many requests waiting", 503, headers={"Retry-After": "1"}
            ) from None
        for event in reply_events(self.job.steps(self.client_gone), request.stops, request.tools):
            if isinstance(event, Ending):
                self.ending = event
            yield event

    def end_job(self) -> None:
        """Cancel the request's job if it still runs (its client went, or its reply failed) and wait for it to
        leave the worker (at its next step)."""
        self.job.cancelled.set()
        if self.job.started_at is not None:
            self.job.ended.wait(timeout=5)

    def client_gone(self) -> bool:
        """Whether the client closed its connection (checked between tokens, without consuming anything)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def send_stream(self, stream, events: Iterator) -> None:
        """A streamed reply: `stream.frames(events)` as server-sent events. The first event is awaited before the
        headers go, so that errors of the generation's start are still a 4xx and not a broken stream."""
        first = next(events, None)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection, self.stream = True, stream
        for frame in stream.frames(chain([first] if first is not None else [], events)):
            self.wfile.write(frame)
            self.wfile.flush()

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

    def models_json(self) -> dict:
        registry = self.state.registry
        data = []
        for spec in registry.listed():
            served = registry.loaded.get(spec.key)
            entry = {"id": spec.name, "object": "model", "created": 0, "owned_by": "mlx_gemma3", "kind": spec.kind}
            entry["loaded"] = served is not None
            if spec.kind == "chat":
                entry["vision"] = registry.reads_images(spec)
                entry["base_model"] = registry.is_base_model(spec)  # no chat template: it continues text
            data.append(entry)
        return {"object": "list", "data": data}

    def moderate(self) -> None:
        """ShieldGemma 2 scores for the request's images, computed on the worker's thread (one call)."""
        body = self.read_json()
        served = self.served_model(body.get("model"))
        check_moderator(served.model)
        if self.state.mirror is not None:
            raise RequestError(
                "moderation does not run on a distributed server (--distributed): serve ShieldGemma 2 from one process"
            )
        request = parse_moderation(body, self.state.image_dirs)
        self.send_json(
            200, self.on_worker(served, lambda: moderate(served.model, served.processor, request, served.name))
        )

    def on_worker(self, served: Served, function: Callable[[], dict]) -> dict:
        """`function()` run on the model's worker thread between generation steps (a 503 when its queue is full)."""
        try:
            return served.worker.call(function)
        except QueueFull:
            raise RequestError(
                "the server is busy: too many requests waiting", 503, headers={"Retry-After": "1"}
            ) from None

    # Transport.

    def send_page_file(self, data: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in PAGE_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a garbled request line, headers too long...) as JSON errors too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # what http.server assumes of a request line it cannot read
            self.request_version = "HTTP/1.0"  # so the reply has a status line and headers
        self.send_error_json(RequestError(message or HTTPStatus(code).phrase, code))

    def reply_error(self, error: RequestError) -> None:
        if not self.sent_headers:
            self.send_error_json(error)
            return
        try:  # mid-stream (after its first token): the error is the stream's last event
            if self.stream is not None:
                self.wfile.write(self.stream.error(error))
                self.wfile.flush()
        except OSError:
            pass
        self.close_connection = True

    def send_error_json(self, error: RequestError) -> None:
        self.send_json(error.status, self.error_shape(error), error.headers)


def host_name(host: str) -> str:
    """The name in a Host header, without its port: 'localhost:8080' → 'localhost', '[::1]:80' → '[::1]'."""
    host = host.strip().lower()
    return host[: host.find("]") + 1] if host.startswith("[") else host.split(":")[0]

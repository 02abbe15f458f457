"""`python -m mlx_gemma3.server`: a local HTTP API (OpenAI's chat completions and Responses, Anthropic's Messages)
for one or several Gemma 3 models.

Internal: a command line, whose flags are its interface; the Python API is listed in docs/api.md."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import mlx.core as mx

from .cli import (
    Parser,
    add_adapter_flag,
    add_chat_template_args_flag,
    add_distributed_flag,
    add_speculative_flags,
    exit_with,
    notice_base_model,
    refuse_distributed,
    run,
)
from .distributed.group import rank, stall_guard
from .distributed.serving import Follower, Leader, follow
from .errors import Gemma3Error
from .generation.step import PREFILL_STEP_SIZE
from .loader import load, load_embedding
from .model.device import bound_buffer_cache, wire_memory
from .model.sources import SOURCES, is_repo_id, model_folder, model_name
from .serve.http import (
    MAX_BATCH,
    MAX_LOADED_MODELS,
    MAX_QUEUE,
    MAX_TOKENS_LIMIT,
    REQUEST_TIMEOUT,
    ServerState,
    make_server,
)
from .serve.prompt_cache import DEFAULT_BYTES, DEFAULT_ENTRIES, PromptCacheStore
from .serve.registry import ModelSpec
from .serve.responses import STORED_RESPONSES
from .serve.worker import Worker

DRAFT_NAME = "draft"  # the registry's name for --draft-model
CACHE_LIMIT_BYTES = 2**30  # MLX keeps at most this much freed memory for reuse (mx.set_cache_limit)


def port_number(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"--port must be a number from 0 to 65535, got {text!r}")
    return int(text)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def whole(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number (0 or more), got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        "server", description="Serve Gemma 3 models over the OpenAI (chat, Responses) and Anthropic (Messages) APIs."
    )
    parser.add_argument(
        "--model",
        action="append",
        help="MLX model folder, .gguf file or Hugging Face repo id (default: the demo 270M, a base model); give it "
        "again to serve several models, picked by each request's 'model' (or a folder of model folders)",
    )
    parser.add_argument(
        "--served-model-name",
        action="append",
        metavar="NAME",
        help="the name requests use for the model (default: its folder's name, a .gguf file's stem or the repo "
        "id); one per --model, in order",
    )
    parser.add_argument(
        "--max-loaded-models",
        type=whole,
        default=MAX_LOADED_MODELS,
        metavar="N",
        help=f"models kept loaded at once; the least recently used goes first (default {MAX_LOADED_MODELS}; 0: all)",
    )
    parser.add_argument(
        "--max-model-bytes",
        type=whole,
        default=0,
        metavar="B",
        help="most bytes the loaded models' weights may take together; the least recently used goes first "
        "(default 0: no bound)",
    )
    parser.add_argument(
        "--stored-responses",
        type=whole,
        default=STORED_RESPONSES,
        metavar="N",
        help=f"/v1/responses results kept in memory for previous_response_id and GET (default {STORED_RESPONSES})",
    )
    add_adapter_flag(parser)
    add_chat_template_args_flag(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=port_number, default=8080, help="port (default 8080; 0: any free port)")
    parser.add_argument(
        "--max-tokens-limit", type=int, default=MAX_TOKENS_LIMIT, help="largest max_tokens a request may ask"
    )
    parser.add_argument(
        "--allowed-image-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder whose images requests may name by local path (repeatable; default: none, data URLs only)",
    )
    parser.add_argument(
        "--cors-origin", help="the one browser origin allowed to call the API (default: no CORS headers)"
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name to serve besides localhost, 127.0.0.1, [::1] and --host (repeatable)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MLX_GEMMA3_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $MLX_GEMMA3_API_KEY, else no key)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=MAX_QUEUE,
        help=f"requests that may wait while one generates; more get 503 (default {MAX_QUEUE})",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=REQUEST_TIMEOUT,
        help=f"seconds a client may take to send its request (default {REQUEST_TIMEOUT:g})",
    )
    parser.add_argument(
        "--prompt-cache-size",
        type=int,
        default=DEFAULT_ENTRIES,
        metavar="N",
        help=f"KV caches kept across requests, reused by the longest common prefix (default {DEFAULT_ENTRIES}; 0: off)",
    )
    parser.add_argument(
        "--prompt-cache-bytes",
        type=int,
        default=DEFAULT_BYTES,
        metavar="B",
        help=f"most bytes those caches may hold together (default {DEFAULT_BYTES}; 0: off)",
    )
    parser.add_argument(
        "--max-batch",
        type=positive,
        default=MAX_BATCH,
        metavar="N",
        help=f"requests decoded together, each joining after its prefill (default {MAX_BATCH}; 1: one at a time)",
    )
    parser.add_argument(
        "--prefill-step-size",
        type=positive,
        default=PREFILL_STEP_SIZE,
        metavar="N",
        help=f"most prompt tokens prefilled between two tokens of the running requests: one chunk per iteration "
        f"(default {PREFILL_STEP_SIZE})",
    )
    parser.add_argument(
        "--embedding-model",
        metavar="MODEL",
        help="also answer POST /v1/embeddings with this EmbeddingGemma model (a folder converted with "
        "mlx_gemma3.convert, or a Hub repo id of one)",
    )
    parser.add_argument("--no-web", action="store_true", help="do not serve the chat page at / (the API only)")
    add_speculative_flags(parser)
    add_distributed_flag(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        refuse_distributed(args, "server")
        mx.set_cache_limit(CACHE_LIMIT_BYTES)  # this process serves for long: MLX's freed buffers stay bounded
        specs = model_specs(args)
        policy = dict(
            max_tokens_limit=args.max_tokens_limit,
            image_dirs=tuple(args.allowed_image_dir),
            api_key=args.api_key,
            cors_origin=args.cors_origin,
            allowed_hosts=tuple(args.allowed_host),
            max_queue=args.max_queue,
            request_timeout=args.request_timeout,
            extra_options={"num_draft_tokens": args.num_draft_tokens, "prompt_lookup": args.prompt_lookup},
            prompt_cache_size=args.prompt_cache_size,
            prompt_cache_bytes=args.prompt_cache_bytes,
            max_batch=args.max_batch,
            prefill_step_size=args.prefill_step_size,
            web=not args.no_web,
            max_loaded_models=args.max_loaded_models,
            max_model_bytes=args.max_model_bytes,
            stored_responses=args.stored_responses,
            chat_template_args=args.chat_template_args or {},
        )
        if not args.distributed:
            serve(ServerState(models=specs, load_model=model_loader(args), **policy), args)
            return 0
        if len(specs) > 1:
            raise Gemma3Error("server --distributed serves one model: give one --model")
        folder = model_folder(specs[0].source)
        model, processor = load(folder, adapter_path=args.adapter_path, distributed=args.distributed)
        hold_memory(model, args.max_batch)
        if rank(args.distributed) > 0:
            return follow_rank_zero(model, processor, args)
        notice_base_model(processor, folder)
        state = ServerState(model, processor, specs[0].name, **policy)
        with stall_guard(args.distributed) or nullcontext() as guard:
            if guard is not None:
                state.mirror = Leader(mx.distributed.init(), guard)
            serve(state, args)
        return 0

    return run(body)


def model_specs(args) -> list[ModelSpec]:
    """The models to serve: each --model (a folder of model folders gives each of them), named by
    --served-model-name or their own name, with --draft-model as every chat model's draft."""
    sources = args.model or [None]
    names = args.served_model_name
    if names is not None and len(names) != len(sources):
        raise Gemma3Error(f"--served-model-name: give one name per --model ({len(sources)}), in order")
    draft = DRAFT_NAME if args.draft_model else None
    specs = []
    for i, source in enumerate(sources):
        inner = model_folders(source)
        if inner and names is not None:
            raise Gemma3Error(f"--served-model-name names one model, and {source} is a folder of model folders")
        for folder in inner or [source]:
            check_source(folder)
            specs.append(ModelSpec(names[i] if names else model_name(folder), source_text(folder), draft=draft))
    if args.draft_model:
        check_source(args.draft_model)
        specs.append(ModelSpec(DRAFT_NAME, args.draft_model, "draft"))
    if args.embedding_model:
        check_source(args.embedding_model)
        specs.append(ModelSpec(model_name(args.embedding_model), source_text(args.embedding_model), "embedding"))
    taken = [spec.key for spec in specs]
    doubled = sorted({name for kind, name in taken if taken.count((kind, name)) > 1})
    if doubled:
        raise Gemma3Error(f"two models go by {', '.join(doubled)}: give them other names (--served-model-name)")
    if args.adapter_path and len([spec for spec in specs if spec.kind == "chat"]) > 1:
        raise Gemma3Error("--adapter-path applies to one model: serve one --model with it")
    return specs


def model_folders(source) -> list[Path]:
    """The model folders in a folder of model folders (a folder with no config.json of its own), by name."""
    path = Path(source).expanduser() if source is not None else None
    if path is None or not path.is_dir() or (path / "config.json").is_file():
        return []
    inner = sorted(folder for folder in path.iterdir() if (folder / "config.json").is_file())
    if not inner:
        raise Gemma3Error(f"{path} holds no model: neither a config.json nor folders with one")
    return inner


def check_source(source) -> None:
    """A source that cannot load is an error now, not at a request far later."""
    if source is None or Path(source).expanduser().exists() or is_repo_id(str(source)):
        return
    raise Gemma3Error(f"model {source} does not exist: pass {SOURCES}")


def source_text(source) -> str:
    return "" if source is None else str(Path(source).expanduser()) if Path(source).expanduser().exists() else source


def model_loader(args):
    """How the registry loads a model: its source to a folder (a GGUF converted, a repo downloaded), loaded, with
    --adapter-path on the chat model; the note a base model gets, once, when it loads."""

    def load_spec(spec: ModelSpec):
        folder = model_folder(spec.source or None)
        if spec.kind == "embedding":
            return load_embedding(folder), None
        model, processor = load(folder, adapter_path=args.adapter_path if spec.kind == "chat" else None)
        if spec.kind == "chat":
            notice_base_model(processor, folder)
            hold_memory(model, args.max_batch)
        return model, processor

    return load_spec


def hold_memory(model, rows: int) -> None:
    """A Mac's memory habits for a long-running server (as mlx-lm's server), applied as each chat model loads:
    memory wired up to the GPU's recommended working set for the process's life, with one warning line if the
    weights, or the KV of `rows` requests at the full context, would not fit; and MLX's buffer cache bounded to a
    quarter of the memory this model's weights leave (model/device.py)."""
    context = model.config.text.max_position_embeddings
    wire_memory(model, context, rows=rows, how="max_kv_size={n} in each request (or a lower --max-batch)")
    bound_buffer_cache(model)


def serve(state: ServerState, args) -> None:
    """Bind the port (first: a busy port is one line, before any model loads), load the first model, serve."""
    try:
        server = make_server(state, args.host, args.port)
    except (OSError, OverflowError) as e:
        raise Gemma3Error(f"cannot listen on {args.host}:{args.port}: {getattr(e, 'strerror', None) or e}") from None
    try:
        if state.model is None:
            state.worker = state.registry.preload().worker
        address = f"http://{args.host}:{server.server_address[1]}"
        page = "" if args.no_web else f" (chat page: {address}/)"
        spread = f", across {mx.distributed.init().size()} ranks ({args.distributed})" if args.distributed else ""
        names = ", ".join(spec.name for spec in state.registry.listed())
        print(f"serving {names} on {address}/v1{page}{spread}", file=sys.stderr, flush=True)
        server.serve_forever()
    finally:
        server.server_close()


def follow_rank_zero(model, processor, args) -> int:
    """A distributed server's rank > 0: no HTTP, it replays rank 0's batch until rank 0 stops."""
    store = PromptCacheStore(args.prompt_cache_size, args.prompt_cache_bytes, evicts=False)
    with stall_guard(args.distributed) as guard:
        worker = Worker(
            model,
            processor,
            store=store,
            mirror=Follower(guard),
            threaded=False,
            prefill_step_size=args.prefill_step_size,
        )
        follow(worker, mx.distributed.init(), guard)
    return 0


if __name__ == "__main__":
    exit_with(main())

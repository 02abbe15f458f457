"""`python -m mlx_gemma3.server`: an OpenAI-compatible local HTTP API for a Gemma 3 model."""

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
    add_distributed_flag,
    add_speculative_flags,
    exit_with,
    notice_base_model,
    refuse_distributed,
    run,
    speculative_options,
)
from .distributed.group import rank, stall_guard
from .distributed.serving import Follower, Leader, follow
from .errors import Gemma3Error
from .loader import load
from .model.device import bound_buffer_cache, wire_memory
from .model.sources import model_folder
from .serve.http import MAX_BATCH, MAX_QUEUE, MAX_TOKENS_LIMIT, REQUEST_TIMEOUT, ServerState, make_server
from .serve.prompt_cache import DEFAULT_BYTES, DEFAULT_ENTRIES, PromptCacheStore
from .serve.worker import Worker


def port_number(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"--port must be a number from 0 to 65535, got {text!r}")
    return int(text)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m mlx_gemma3.server", description="Serve a Gemma 3 model over an OpenAI-style API.")
    parser.add_argument(
        "--model", help="MLX model folder, .gguf file or Hugging Face repo id (default: the demo 270M, a base model)"
    )
    add_adapter_flag(parser)
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
    parser.add_argument("--no-web", action="store_true", help="do not serve the chat page at / (the API only)")
    add_speculative_flags(parser)
    add_distributed_flag(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        refuse_distributed(args, "server")
        folder = model_folder(args.model)
        model, processor = load(folder, adapter_path=args.adapter_path, distributed=args.distributed)
        if rank(args.distributed) > 0:
            return follow_rank_zero(model, processor, args)
        notice_base_model(processor, folder)
        hold_memory(model, args.max_batch)
        state = ServerState(
            model,
            processor,
            Path(folder).name,
            args.max_tokens_limit,
            image_dirs=tuple(args.allowed_image_dir),
            api_key=args.api_key,
            cors_origin=args.cors_origin,
            allowed_hosts=tuple(args.allowed_host),
            max_queue=args.max_queue,
            request_timeout=args.request_timeout,
            extra_options=speculative_options(args),
            prompt_cache_size=args.prompt_cache_size,
            prompt_cache_bytes=args.prompt_cache_bytes,
            max_batch=args.max_batch,
            web=not args.no_web,
        )
        with stall_guard(args.distributed) or nullcontext() as guard:
            if guard is not None:
                state.mirror = Leader(mx.distributed.init(), guard)
            serve(state, args)
        return 0

    return run(body)


def hold_memory(model, rows: int) -> None:
    """A Mac's memory habits for a long-running server (as mlx-lm's server): the model's memory wired up to the
    GPU's recommended working set for the process's life, with one warning line if the weights, or the KV of
    `rows` requests at the full context, would not fit; and MLX's buffer cache bounded (model/device.py)."""
    context = model.config.text.max_position_embeddings
    wire_memory(model, context, rows=rows, how="max_kv_size={n} in each request (or a lower --max-batch)")
    bound_buffer_cache(model)


def serve(state: ServerState, args) -> None:
    try:
        server = make_server(state, args.host, args.port)
    except (OSError, OverflowError) as e:
        raise Gemma3Error(f"cannot listen on {args.host}:{args.port}: {getattr(e, 'strerror', None) or e}") from None
    address = f"http://{args.host}:{server.server_address[1]}"
    page = "" if args.no_web else f" (chat page: {address}/)"
    spread = f", across {mx.distributed.init().size()} ranks ({args.distributed})" if args.distributed else ""
    print(f"serving {state.model_id} on {address}/v1{page}{spread}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def follow_rank_zero(model, processor, args) -> int:
    """A distributed server's rank > 0: no HTTP, it replays rank 0's batch until rank 0 stops."""
    store = PromptCacheStore(args.prompt_cache_size, args.prompt_cache_bytes, evicts=False)
    with stall_guard(args.distributed) as guard:
        worker = Worker(model, processor, store=store, mirror=Follower(guard), threaded=False)
        follow(worker, mx.distributed.init(), guard)
    return 0


if __name__ == "__main__":
    exit_with(main())

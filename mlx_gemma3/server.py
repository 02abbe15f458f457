"""`python -m mlx_gemma3.server`: an OpenAI-compatible local HTTP API for a Gemma 3 model."""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import Parser, exit_with, notice_base_model, run
from .errors import Gemma3Error
from .model.load import load
from .model.sources import model_folder
from .serve.server import MAX_TOKENS_LIMIT, ServerState, make_server


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m mlx_gemma3.server", description="Serve a Gemma 3 model over an OpenAI-style API.")
    parser.add_argument(
        "--model", help="MLX model folder, .gguf file or Hugging Face repo id (default: the demo 270M, a base model)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--max-tokens-limit", type=int, default=MAX_TOKENS_LIMIT, help="largest max_tokens a request may ask")
    args = parser.parse_args(argv)

    def body() -> int:
        folder = model_folder(args.model)
        model, processor = load(folder)
        notice_base_model(processor, folder)
        state = ServerState(model, processor, Path(folder).name, args.max_tokens_limit)
        try:
            server = make_server(state, args.host, args.port)
        except OSError as e:
            raise Gemma3Error(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
        print(f"serving {state.model_id} on http://{args.host}:{args.port}/v1", file=sys.stderr)
        try:
            server.serve_forever()
        finally:
            server.server_close()
        return 0

    return run(body)


if __name__ == "__main__":
    exit_with(main())

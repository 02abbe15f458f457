"""`mlx-gemma3 COMMAND ...` and `python -m mlx_gemma3`: one entry point for every command line."""

from __future__ import annotations

import runpy
import sys

COMMANDS = {
    "generate": "generate text from a prompt",
    "chat": "chat in the terminal (keeps the cache between turns)",
    "embed": "embed texts into vectors with EmbeddingGemma",
    "server": "serve an OpenAI-compatible HTTP API",
    "convert": "convert a Hugging Face checkpoint or a GGUF file into an MLX folder",
    "benchmark": "measure prefill and decode speed and memory",
    "shield": "score images against safety policies with ShieldGemma 2",
    "lora": "fine-tune on jsonl data (LoRA, DoRA, QLoRA or full)",
    "fuse": "fold fine-tuned adapters into a new model folder",
}


def usage() -> str:
    lines = ["usage: mlx-gemma3 COMMAND [flags]   (or python -m mlx_gemma3.COMMAND [flags])", "", "commands:"]
    lines += [f"  {name:<10} {what}" for name, what in COMMANDS.items()]
    lines += ["", "mlx-gemma3 COMMAND --help lists a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sys.argv = [f"mlx-gemma3 {name}", *rest]
    runpy.run_module(f"mlx_gemma3.{name}", run_name="__main__", alter_sys=True)  # ends with the command's exit
    return 0


def entry_point() -> None:
    """The `mlx-gemma3` console script."""
    raise SystemExit(main())


if __name__ == "__main__":
    entry_point()

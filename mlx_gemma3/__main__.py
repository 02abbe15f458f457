"""`mlx-gemma3 COMMAND ...` and `python -m mlx_gemma3`: one entry point for every command line.

Internal: a command line, whose flags are its interface; the Python API is listed in docs/api.md."""

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


def usage(runner: str) -> str:
    lines = [f"usage: {runner} COMMAND [flags]   (or python -m mlx_gemma3.COMMAND [flags])", "", "commands:"]
    lines += [f"  {name:<10} {what}" for name, what in COMMANDS.items()]
    lines += ["", f"{runner} COMMAND --help lists a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None, runner: str = "mlx-gemma3") -> int:
    """Run one command; `runner`: how this entry point was started, which the command's usage line repeats."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(runner))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # The command's parser names itself after sys.argv[0] (cli.command_name); alter_sys would replace it with the
    # module's file. The run ends with the command's exit.
    sys.argv = [f"{runner} {name}", *rest]
    runpy.run_module(f"mlx_gemma3.{name}", run_name="__main__")
    return 0


def entry_point() -> None:
    """The `mlx-gemma3` console script."""
    raise SystemExit(main())


if __name__ == "__main__":
    raise SystemExit(main(runner="python -m mlx_gemma3"))

"""`python -m mlx_gemma3.chat`: an interactive chat that keeps its cache between turns."""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import (
    Parser, add_model_flags, add_sampling_flags, add_speculative_flags, notice_base_model, refuse_distributed, run,
    sampling_options, speculative_options,
)
from .errors import Gemma3Error
from .generation.chat import Chat
from .generation.stream import TEXT_ONLY
from .model.load import load
from .model.sources import model_folder
from .processing.image import open_image

COMMANDS = "/image PATH (attach to your next message), /reset, /system TEXT, /save FILE, /load FILE, /quit"
HELP = f"Commands: {COMMANDS}. Ctrl-C stops a reply; Ctrl-D quits."
PROMPT = ">> "


def parse_args(argv: list[str] | None):
    parser = Parser(prog="python -m mlx_gemma3.chat", description="Chat with a Gemma 3 model.")
    add_model_flags(parser)
    add_sampling_flags(parser)
    add_speculative_flags(parser)
    parser.add_argument("--pan-and-scan", action="store_true", help="add up to 4 crops of wide or tall images")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        refuse_distributed(args, "chat")
        folder = model_folder(args.model)
        model, processor = load(folder, adapter_path=args.adapter_path)
        notice_base_model(processor, folder)
        chat = Chat(model, processor, system=args.system, pan_and_scan=args.pan_and_scan, **chat_options(args, processor))
        if args.prompt_cache_file and Path(args.prompt_cache_file).is_file():
            chat.load(args.prompt_cache_file)
            print(f"[continuing {args.prompt_cache_file}: {len(chat.cached_ids)} tokens reused]", file=sys.stderr)
        print(HELP, file=sys.stderr)
        repl(chat, sys.stdin.isatty())
        if args.prompt_cache_file:
            chat.save(args.prompt_cache_file)
        return 0

    return run(body)


def chat_options(args, processor) -> dict:
    options = sampling_options(args, processor)
    options.pop("prefill_progress", None)  # a chat turn prefills only the new turn
    return {**options, **speculative_options(args)}


def repl(chat: Chat, interactive: bool) -> None:
    """Read lines until /quit or end of input; the `>> ` prompt only when a person types (stdin a terminal)."""
    attached: list[str] = []
    while True:
        try:
            line = input(PROMPT if interactive else "")
        except EOFError:
            if interactive:
                print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if line.strip() in ("/quit", "/exit"):
            return
        try:
            if line.startswith("/image "):
                attached.append(attach(chat, line.removeprefix("/image ").strip()))
            elif line.startswith("/"):
                command(chat, line)
            elif line.strip():
                images, attached = attached, []
                reply(chat, line, images)
        except Gemma3Error as e:
            print(f"error: {e}", file=sys.stderr)


def command(chat: Chat, line: str) -> None:
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name == "/reset":
        chat.reset()
        print("[conversation reset]", file=sys.stderr)
    elif name == "/system":
        chat.set_system(argument or None)
        print("[system prompt set; conversation reset]", file=sys.stderr)
    elif name in ("/save", "/load") and argument:
        getattr(chat, name[1:])(argument)
        print(f"[{'saved to' if name == '/save' else 'loaded'} {argument}]", file=sys.stderr)
    elif name in ("/save", "/load", "/image"):
        print(f"{name} needs a file: {name} FILE", file=sys.stderr)
    else:
        if name not in ("/help", "/?"):
            print(f"unknown command {name}", file=sys.stderr)
        print(HELP, file=sys.stderr)


def attach(chat: Chat, path: str) -> str:
    """Check an image now (a text-only model or a bad file is refused here, not after the next message)."""
    if chat.model.config.vision is None:
        raise Gemma3Error(TEXT_ONLY)
    open_image(path)
    print(f"[image {path} attached to your next message]", file=sys.stderr)
    return path


def reply(chat: Chat, line: str, images: list[str]) -> None:
    responses = chat.stream(line, images=images or None)
    try:
        for response in responses:
            print(response.text, end="", flush=True)
        print()
    except KeyboardInterrupt:
        responses.close()
        print("\n[stopped]", file=sys.stderr)


if __name__ == "__main__":
    from .cli import exit_with

    exit_with(main())

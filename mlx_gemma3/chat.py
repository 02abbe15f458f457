"""`python -m mlx_gemma3.chat`: an interactive chat that keeps its cache between turns.

Internal: a command line, whose flags are its interface; the Python API is listed in docs/api.md."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import ExitStack, nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path

import mlx.core as mx

from .cli import (
    Parser,
    add_chat_template_args_flag,
    add_model_flags,
    add_sampling_flags,
    add_speculative_flags,
    check_cache_file_flag,
    generating_memory,
    notice_base_model,
    refuse_distributed,
    requested_context,
    run,
    sampling_options,
    speculative_options,
)
from .distributed.group import rank, share_object, stall_guard
from .errors import Gemma3Error
from .generation.conversation import Chat
from .generation.text_stream import TEXT_ONLY
from .loader import load
from .model.sources import model_folder
from .processing.image import open_image

COMMANDS = "/image PATH (attach to your next message), /reset, /system TEXT, /save FILE, /load FILE, /quit"
HELP = f"Commands: {COMMANDS}. Ctrl-C stops a reply; Ctrl-D quits."
PROMPT = ">> "


def parse_args(argv: list[str] | None):
    parser = Parser("chat", description="Chat with a Gemma 3 model.")
    add_model_flags(parser)
    add_chat_template_args_flag(parser)
    add_sampling_flags(parser)
    add_speculative_flags(parser)
    parser.add_argument("--pan-and-scan", action="store_true", help="add up to 4 crops of wide or tall images")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        refuse_distributed(args, "chat")
        check_cache_file_flag(args)
        folder = model_folder(args.model)
        model, processor = load(folder, adapter_path=args.adapter_path, distributed=args.distributed)
        with ExitStack() as stack:
            if rank(args.distributed) > 0:  # every rank runs the chat; only rank 0 speaks
                quiet = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(redirect_stdout(quiet))
                stack.enter_context(redirect_stderr(quiet))
            guard = stack.enter_context(stall_guard(args.distributed) or nullcontext())
            stack.enter_context(generating_memory(model, args, requested_context(model, 0, -1)))
            notice_base_model(processor, folder, sys.stdout)  # with the conversation, where it is read
            chat = Chat(
                model, processor, system=args.system, pan_and_scan=args.pan_and_scan, **chat_options(args, processor)
            )
            if args.prompt_cache_file and Path(args.prompt_cache_file).is_file():
                chat.load(args.prompt_cache_file)
                print(f"[continuing {args.prompt_cache_file}: {len(chat.cached_keys)} tokens reused]", file=sys.stderr)
            print(HELP, file=sys.stderr)
            interactive = sys.stdin.isatty()
            repl(chat, shared_input(interactive, guard) if guard is not None else local_input(interactive), guard)
            if args.prompt_cache_file:
                chat.save(args.prompt_cache_file)
        return 0

    return run(body)


def chat_options(args, processor) -> dict:
    options = sampling_options(args, processor)
    options.pop("prefill_progress", None)  # a chat turn prefills only the new turn
    return {**options, **speculative_options(args), "chat_template_kwargs": args.chat_template_args}


def local_input(interactive: bool) -> Callable[[], tuple[str, bytes | None] | None]:
    """The next line typed (with no image bytes), None at the end; the `>> ` prompt only when a person types
    (stdin a terminal). Ctrl-C while typing starts a new line."""

    def read() -> tuple[str, bytes | None] | None:
        while True:
            try:
                line = input(PROMPT if interactive else "")
            except EOFError:
                if interactive:
                    print()
                return None
            except KeyboardInterrupt:
                print()
                continue
            return line, None

    return read


def shared_input(interactive: bool, guard) -> Callable[[], tuple[str, bytes | None] | None]:
    """Distributed: rank 0 reads (with no stall limit while a person types) and every rank gets its line and,
    for `/image PATH`, the file's bytes (an image needs to be on rank 0's disk only)."""
    read, group = local_input(interactive), mx.distributed.init()

    def rank_zero_read() -> tuple[str, bytes | None] | None:
        item = read()
        return item if item is None else (item[0], image_bytes(item[0]))

    def shared() -> tuple[str, bytes | None] | None:
        guard.pause()
        item = share_object(rank_zero_read() if group.rank() == 0 else None, group)
        guard.pet()
        return item

    return shared


def image_bytes(line: str) -> bytes | None:
    if not line.startswith("/image "):
        return None
    try:
        return Path(line.removeprefix("/image ").strip()).read_bytes()
    except OSError:
        return None  # attach() says what is wrong with the path


def repl(chat: Chat, read: Callable[[], tuple[str, bytes | None] | None], guard=None) -> None:
    """Read lines until /quit or end of input. Distributed (`guard`: the stall guard), every rank runs this loop
    on rank 0's lines; a reply cannot be stopped alone there: Ctrl-C ends the chat."""
    attached: list = []
    while (item := read()) is not None:
        line, data = item
        if line.strip() in ("/quit", "/exit"):
            return
        try:
            if line.startswith("/image "):
                attached.append(attach(chat, line.removeprefix("/image ").strip(), data))
            elif line.startswith(("/save", "/load")) and guard is not None:
                raise Gemma3Error(
                    f"{line.split()[0]} does not work in a distributed chat: each rank holds only its part of the cache"
                )
            elif line.startswith("/"):
                command(chat, line)
            elif line.strip():
                images, attached = attached, []
                reply(chat, line, images, guard)
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


def attach(chat: Chat, path: str, data: bytes | None = None):
    """Check an image now (a text-only model or a bad file is refused here, not after the next message); the
    image to send: its bytes when read already, else its path."""
    if chat.model.config.vision is None:
        raise Gemma3Error(TEXT_ONLY)
    image = data if data is not None else path
    open_image(image)
    print(f"[image {path} attached to your next message]", file=sys.stderr)
    return image


def reply(chat: Chat, line: str, images: list, guard=None) -> None:
    turn = {} if guard is None else {"prefill_progress": guard.petting()}
    responses = chat.stream(line, images=images or None, **turn)
    try:
        for response in responses:
            if guard is not None:
                guard.pet()
            print(response.text, end="", flush=True)
        print()
    except KeyboardInterrupt:
        responses.close()
        if guard is not None:
            raise  # the other ranks are still generating: the whole chat ends
        print("\n[stopped]", file=sys.stderr)


if __name__ == "__main__":
    from .cli import exit_with

    exit_with(main())

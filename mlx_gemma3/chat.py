"""`python -m mlx_gemma3.chat`: an interactive chat that keeps its cache between turns."""

from __future__ import annotations

import sys

from .model.sources import model_folder
from .cli import Parser, add_model_flags, add_sampling_flags, run, sampling_options
from .generation.chat import Chat
from .errors import Gemma3Error
from .processing.image import open_image
from .model.load import load


HELP = (
    "Commands: /image PATH (attach to your next message), /reset, /system TEXT, /save FILE, /load FILE, /quit. "
    "Ctrl-C stops a reply; Ctrl-D quits."
)


def parse_args(argv: list[str] | None):
    parser = Parser(prog="python -m mlx_gemma3.chat", description="Chat with a Gemma 3 model.")
    add_model_flags(parser)
    add_sampling_flags(parser)
    parser.add_argument("--pan-and-scan", action="store_true", help="add up to 4 crops of wide or tall images")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        model, processor = load(model_folder(args.model))
        chat = Chat(model, processor, system=args.system, pan_and_scan=args.pan_and_scan, **sampling_options(args))
        print(HELP, file=sys.stderr)
        repl(chat)
        return 0

    return run(body)


def repl(chat: Chat) -> None:
    attached: list[str] = []
    while True:
        try:
            line = input(">> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if line.strip() in ("/quit", "/exit"):
            return
        try:
            if line.startswith("/image "):
                attached.append(attach(line.removeprefix("/image ").strip()))
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
    else:
        print(HELP, file=sys.stderr)


def attach(path: str) -> str:
    open_image(path)  # a bad file is reported now, not after the next message
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

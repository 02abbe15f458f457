"""`python -m mlx_gemma3.generate`: print a model's continuation of a prompt, then speed and memory.

Internal: a command line, whose flags are its interface; the Python API is listed in docs/api.md."""

from __future__ import annotations

import sys
from contextlib import nullcontext

from .cli import (
    Parser,
    add_chat_template_args_flag,
    add_constraint_flags,
    add_model_flags,
    add_sampling_flags,
    add_speculative_flags,
    check_cache_file_flag,
    constraint_options,
    generating_memory,
    notice_base_model,
    opened_images,
    requested_context,
    run,
    sampling_options,
    speculative_options,
)
from .distributed.group import rank, stall_guard, weights_per_rank
from .errors import Gemma3Error
from .generation.text_stream import GenerationResponse, stream_generate
from .loader import load
from .model.sources import model_folder
from .processing.prompt import IMAGE_MARK, SYSTEM_WITHOUT_CHAT

EPILOG = (
    "Without --model the demo Gemma 3 270M (a base model: it continues text) is used. To try a GGUF file, "
    "the demo's own: --model \"$(python -c 'import mlx_gemma3; print(mlx_gemma3.demo_gguf())')\" "
    "(it shares the demo's conversion)."
)


def parse_args(argv: list[str] | None):
    parser = Parser("generate", description="Generate text with a Gemma 3 model.", epilog=EPILOG)
    add_model_flags(parser)
    parser.add_argument("--prompt", "-p", required=True, help="the prompt; '-' reads it from standard input")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image for the prompt (repeatable); placed where the prompt says <start_of_image>, else before it",
    )
    parser.add_argument("--pan-and-scan", action="store_true", help="add up to 4 crops of wide or tall images")
    add_sampling_flags(parser)
    add_speculative_flags(parser)
    add_constraint_flags(parser)
    parser.add_argument(
        "--no-chat-template",
        "--ignore-chat-template",
        dest="no_chat_template",
        action="store_true",
        help="complete the prompt as plain text",
    )
    add_chat_template_args_flag(parser, "--chat-template-config")
    parser.add_argument(
        "--verbose",
        type=boolean,
        nargs="?",
        const=True,
        default=True,
        help="print the statistics after the text (default true; 'false' prints the text only)",
    )
    return parser.parse_args(argv)


def boolean(value: str) -> bool:
    if value.lower() in ("true", "t", "1", "yes"):
        return True
    if value.lower() in ("false", "f", "0", "no"):
        return False
    raise ValueError(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if args.system is not None and args.no_chat_template:
            raise Gemma3Error(SYSTEM_WITHOUT_CHAT)
        check_cache_file_flag(args)
        images = opened_images(args.image)
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        folder = model_folder(args.model)
        model, processor = load(folder, distributed=args.distributed, adapter_path=args.adapter_path)
        shown = rank(args.distributed) == 0  # every rank runs the same steps; only rank 0 prints
        if shown and args.system is not None:  # a system prompt makes the prompt a chat, even on a base model
            notice_base_model(processor, folder)
        options = dict(
            sampling_options(args, processor), system=args.system, use_chat_template=not args.no_chat_template
        )
        options["chat_template_kwargs"] = args.chat_template_args
        options.update(pan_and_scan=args.pan_and_scan, images=images or None, prompt_cache_file=args.prompt_cache_file)
        options.update(speculative_options(args))
        guard = stall_guard(args.distributed)
        if guard is not None:
            options["prefill_progress"] = guard.petting(options.get("prefill_progress"))
        options.update(constraint_options(args))
        last, from_draft = None, 0
        text_tokens = len(processor.tokenizer.encode(prompt)) if processor.tokenizer else 0
        image_tokens = (
            len(args.image) * model.config.vision.tokens_per_image if args.image and model.config.vision else 0
        )
        tokens = requested_context(model, text_tokens + image_tokens, args.max_tokens)
        with guard or nullcontext(), generating_memory(model, args, tokens):
            for last in stream_generate(model, processor, image_prompt(prompt, args.image), **options):
                if guard is not None:
                    guard.pet()
                if shown:
                    print(last.text, end="", flush=True)
                from_draft += last.from_draft
            weights = weights_per_rank(model) if args.distributed else None
        if not shown:
            return 0
        print(flush=True)
        if args.prompt_cache_file:
            print(
                f"prompt cache: reused {last.reused_tokens} of {last.reused_tokens + last.prompt_tokens} prompt "
                f"tokens from {args.prompt_cache_file}",
                file=sys.stderr,
            )
        if args.verbose:
            print_stats(last, sys.stderr, from_draft if args.draft_model or args.prompt_lookup else None, weights)
        return 0

    return run(body)


def image_prompt(prompt: str, images: list[str]) -> str:
    """Images with no <start_of_image> in the prompt go before its text, one placeholder each."""
    if not images or IMAGE_MARK in prompt:
        return prompt
    return " ".join([IMAGE_MARK] * len(images)) + " " + prompt


def print_stats(last: GenerationResponse, out, from_draft: int | None = None, weights: list[int] | None = None) -> None:
    """`from_draft`: with speculative decoding, how many generated tokens the draft proposed and the model kept;
    `weights`: distributed, the bytes of text weights each rank holds."""
    print("=" * 10, file=out)
    print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec", file=out)
    print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec", file=out)
    if from_draft is not None:
        share = 100 * from_draft / max(last.generation_tokens, 1)
        print(f"Accepted draft tokens: {from_draft} of {last.generation_tokens} generated ({share:.1f}%)", file=out)
    print(f"Peak memory: {last.peak_memory:.3f} GB", file=out)
    if weights is not None:
        shares = ", ".join(f"rank {i}: {b / 1e6:.3f} MB ({100 * b / sum(weights):.0f}%)" for i, b in enumerate(weights))
        print(f"Text weights held: {shares}", file=out)


if __name__ == "__main__":
    from .cli import exit_with

    exit_with(main())

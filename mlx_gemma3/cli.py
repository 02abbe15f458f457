"""Shared command-line pieces: one-line argument errors, the model and sampling flags, error-to-exit handling.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from .distributed.group import MODES, is_peer_failure, peer_failure_message
from .errors import Gemma3Error
from .generation.sample import TEMP_RANGE, temp_range_text
from .generation.thread_streams import generation_stream
from .model.cache import writable_cache_path
from .model.device import wired_limit
from .model.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, KV_BITS
from .model.sources import model_folder  # noqa: F401 (the command lines' --model, re-exported)
from .processing.image import open_image
from .processing.prompt import is_base_model
from .processing.tokenizer import single_token_ids


class Parser(argparse.ArgumentParser):
    """argparse that names `command` as it was run (command_name) and reports a bad flag in one line (and exit
    status 2) instead of usage plus error."""

    def __init__(self, command: str, **options):
        super().__init__(prog=command_name(command), **options)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def command_name(command: str) -> str:
    """How `command` was run, as its usage line shows it: `mlx-gemma3 generate` or `python -m mlx_gemma3 generate`
    when the one entry point (__main__.py) ran it, which names it so in sys.argv[0]; else
    `python -m mlx_gemma3.generate`."""
    if sys.argv and sys.argv[0].endswith(f" {command}"):
        return sys.argv[0]
    return f"python -m mlx_gemma3.{command}"


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="MLX model folder, Gemma 3 .gguf file (converted once into the cache) or Hugging Face repo id "
        "(e.g. mlx-community/gemma-3-1b-it-4bit, needs the hub extra); default: the demo Gemma 3 270M (a base model)",
    )
    add_adapter_flag(parser)
    parser.add_argument(
        "--system",
        "--system-prompt",
        dest="system",
        help="system prompt (folded into the first user turn, as Gemma 3 expects)",
    )
    add_distributed_flag(parser)


def add_chat_template_args_flag(parser: argparse.ArgumentParser, *aliases: str) -> None:
    """--chat-template-args JSON (mlx_lm.server's name; `aliases` add mlx_lm.generate's --chat-template-config)."""
    parser.add_argument(
        "--chat-template-args",
        *aliases,
        dest="chat_template_args",
        type=template_args,
        metavar="JSON",
        help="variables for the model's chat template, a JSON object, e.g. TranslateGemma's "
        '\'{"source_lang_code": "en", "target_lang_code": "de"}\'',
    )


def template_args(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--chat-template-args is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--chat-template-args must be a JSON object")
    return value


def add_distributed_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--distributed",
        choices=MODES,
        help="run across the processes mlx.launch started (e.g. mlx.launch --hosts mac1,mac2 -- python -m ...): "
        "'pipeline' splits the layers (for memory), 'tensor' splits every layer (for speed on fast links)",
    )


def refuse_distributed(args: argparse.Namespace, command: str) -> None:
    """One clear error for the flags that do not run across processes."""
    if not args.distributed:
        return
    alone = [
        flag
        for flag, value in (
            ("--draft-model", args.draft_model),
            ("--prompt-lookup", args.prompt_lookup),
            ("--prompt-cache-file", getattr(args, "prompt_cache_file", None)),
        )
        if value
    ]
    if alone:
        raise Gemma3Error(
            f"{command} --distributed does not take {', '.join(alone)} (speculative decoding and cache "
            "files run in one process only): drop it, or run without --distributed"
        )


def add_adapter_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter-path",
        metavar="DIR",
        help="fine-tuned adapters to apply: the folder `python -m mlx_gemma3.lora` wrote (adapter_config.json + "
        "adapters.safetensors)",
    )


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=256,
        help="most tokens to generate (default 256; -1: until the reply or the context ends)",
    )
    parser.add_argument(
        "--temp",
        type=temperature,
        default=0.0,
        help=f"sampling temperature in {temp_range_text()}; 0 is greedy (default)",
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p × the top probability")
    parser.add_argument("--repetition-penalty", type=float, help="penalise tokens already seen (e.g. 1.1)")
    parser.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    parser.add_argument(
        "--extra-eos-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="also stop at this token (repeatable; each one token of the vocabulary, e.g. '<end_of_image>')",
    )
    parser.add_argument(
        "--max-kv-size",
        type=int,
        metavar="N",
        help="bound each layer's cache to N tokens (more than 4): memory stays flat, and attention then sees "
        "only the first 4 tokens (attention sinks, which keep the model coherent) and the latest N-4",
    )
    add_kv_cache_flags(parser)
    parser.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per prefill chunk")
    parser.add_argument(
        "--prompt-cache-file",
        metavar="PATH",
        help="keep the prompt's KV cache in this file and reuse it when a later prompt starts the same way",
    )


def temperature(text: str) -> float:
    """--temp's value, within the one temperature range (generation.sample.TEMP_RANGE)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not TEMP_RANGE[0] <= value <= TEMP_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be a number in {temp_range_text()} (0 is greedy), got {text!r}")
    return value


def add_speculative_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--draft-model",
        metavar="MODEL",
        help="speculative decoding: a smaller model of the same vocabulary (folder, .gguf or repo id, as --model) "
        "drafts tokens that the model checks in one step; the output is the model's own",
    )
    parser.add_argument(
        "--num-draft-tokens", type=int, default=3, help="tokens the draft model proposes per step (default 3)"
    )
    parser.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="N",
        help="speculative decoding without a draft model: draft up to N tokens by copying what followed the last "
        "few tokens earlier in the prompt and reply (good for edits, summaries, code); 0 is off",
    )


def speculative_options(args: argparse.Namespace) -> dict:
    """The library options the speculative flags stand for (the draft model loaded)."""
    from .loader import load

    options = {"num_draft_tokens": args.num_draft_tokens, "prompt_lookup": args.prompt_lookup}
    if args.draft_model:
        options["draft_model"] = load(model_folder(args.draft_model))[0]
    return options


def add_constraint_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json-schema", metavar="FILE", help="the reply is JSON valid under the JSON schema in FILE")
    group.add_argument("--regex", metavar="R", help="the reply matches the regular expression R")
    group.add_argument(
        "--grammar", metavar="FILE", help="the reply follows the Lark grammar in FILE (llguidance's dialect)"
    )
    parser.add_argument(
        "--no-json-limits",
        action="store_true",
        help="let JSON numbers and whitespace run as long as the schema allows (default: at most 17 fraction "
        "digits, 20 integer digits, a 3-digit exponent, 16 whitespace characters in a row)",
    )


def constraint_options(args: argparse.Namespace) -> dict:
    """The library options the constraint flags stand for (the files read)."""
    options = {"regex": args.regex, "json_limits": not args.no_json_limits}
    if args.json_schema:
        options["json_schema"] = read_text(args.json_schema, "--json-schema")
    if args.grammar:
        options["grammar"] = read_text(args.grammar, "--grammar")
    return options


def read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise Gemma3Error(f"{flag}: cannot read {path}: {e.strerror if isinstance(e, OSError) else e}") from None


def check_cache_file_flag(args: argparse.Namespace) -> None:
    """--prompt-cache-file must name a file in a folder that exists: refused before the model loads."""
    if getattr(args, "prompt_cache_file", None):
        writable_cache_path(args.prompt_cache_file, "--prompt-cache-file")


def opened_images(paths: list[str]) -> list:
    """Each --image, opened and checked now, before the model loads (a missing or broken file is one error)."""
    return [open_image(path) for path in paths]


def add_kv_cache_flags(parser: argparse.ArgumentParser) -> None:
    bits = " or ".join(map(str, KV_BITS))
    parser.add_argument("--kv-bits", type=int, choices=KV_BITS, help=f"quantize the KV cache to {bits} bits")
    parser.add_argument(
        "--kv-group-size",
        type=int,
        default=DEFAULT_GROUP_SIZE,
        choices=GROUP_SIZES,
        help=f"KV quantization group (default {DEFAULT_GROUP_SIZE})",
    )


def sampling_options(args: argparse.Namespace, processor) -> dict:
    """The library options the sampling flags stand for (--extra-eos-token as token ids)."""
    names = (
        "max_tokens",
        "temp",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "seed",
        "max_kv_size",
        "kv_bits",
        "kv_group_size",
        "prefill_step_size",
    )
    options = {name: getattr(args, name) for name in names}
    options["stop_ids"] = tuple(single_token_ids(processor.tokenizer, args.extra_eos_token, "--extra-eos-token"))
    if sys.stderr.isatty():
        options["prefill_progress"] = PrefillProgress()
    return options


class PrefillProgress:
    """One `\r`-updated line on the terminal while a prompt of several chunks is prefilled (none for one chunk)."""

    def __init__(self):
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if done < total:
            self.shown = True
            print(
                f"\rprefill {done}/{total} prompt tokens ({100 * done // total}%)", end="", file=sys.stderr, flush=True
            )
        elif self.shown:
            self.shown = False
            print(f"\rprefill {total}/{total} prompt tokens (100%)", file=sys.stderr, flush=True)


def requested_context(model, prompt_tokens: int, max_tokens: int | None) -> int:
    """Tokens a run may hold: the prompt and max_tokens (the whole context when unlimited), within the context."""
    context = model.config.text.max_position_embeddings
    return context if max_tokens is None or max_tokens < 0 else min(context, prompt_tokens + max_tokens)


def generating_memory(model, args: argparse.Namespace, tokens: int):
    """The memory habits a command line generates under (model/device.py): on Metal the model's memory wired up to
    the recommended working set, with one warning line when the model, or the model and the KV at `tokens`
    tokens, would not fit (naming a --max-kv-size that does); nothing on the CPU."""
    return wired_limit(
        model,
        tokens,
        streams=(generation_stream(),),
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        max_kv_size=args.max_kv_size,
    )


def notice_base_model(processor, folder: str, out=None) -> None:
    """One line (on stderr unless `out` says where) when the model is a base (pre-trained) model: see
    processing.prompt.is_base_model."""
    if is_base_model(processor):
        print(
            f"note: {Path(folder).name} has no chat template, so it is taken for a base (pre-trained) model: it "
            "continues text rather than follows instructions, and a chat with it is written in Gemma 3's chat format "
            "all the same; for a chat, use an instruction-tuned model (e.g. --model mlx-community/gemma-3-1b-it-4bit)",
            file=out or sys.stderr,
            flush=True,
        )


def exit_with(code: int):
    """End a command-line process. MLX's own exit-time cleanup runs too late, so the main thread drops its
    streams first (only here: afterwards this thread can run no MLX work)."""
    from .generation.thread_streams import release_thread_streams

    release_thread_streams()
    raise SystemExit(code)


def run(main: Callable[[], int]) -> int:
    """Run a CLI body: a Gemma3Error becomes one `error:` line and exit 1; Ctrl-C exits 130."""
    try:
        return main()
    except Gemma3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not is_peer_failure(e):
            raise
        print(f"error: {peer_failure_message(e)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): nothing more to say
        return 0

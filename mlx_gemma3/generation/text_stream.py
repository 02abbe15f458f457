"""stream_generate and generate: prompts and images in, text out, with stops and statistics over generate_step.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import difflib
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import Gemma3Error
from ..model.cache import REWIND, writable_cache_path
from ..model.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, KV_BITS
from ..model.text import TEXT_ONLY
from ..processing.grammar import grammar_text
from ..processing.image import process_images
from ..processing.prompt import prompt_ids
from ..processing.tokenizer import EOS_IDS
from .constrain import DEAD_END, Constraint
from .prompt_file import reusable_cache, saving_when_prefilled
from .sample import Sampler, logit_bias, repetition_penalty, sampling_problem
from .speculative import speculative_generate_step
from .step import PREFILL_STEP_SIZE, LogitsProcessor, Progress, generate_step
from .thread_streams import generation_stream


@dataclass
class GenerationResponse:
    """One step of a stream: the new text, the token, why it ended (None while running) and running stats."""

    text: str
    token: int
    finish_reason: str | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    logprobs: mx.array | None = field(default=None, repr=False)  # log-softmax of this step's processed logits [V]
    reused_tokens: int = 0  # prompt tokens that were already in the cache (a chat's earlier turns, a prompt cache file)
    from_draft: bool = False  # speculative decoding: the draft (model or prompt lookup) proposed this token


@dataclass
class Options:
    """Everything stream_generate accepts besides the model, processor and prompt."""

    max_tokens: int | None = 256  # -1 or None: until the reply or the context ends
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    prefill_step_size: int = PREFILL_STEP_SIZE
    prefill_progress: Progress | None = None
    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_GROUP_SIZE
    max_kv_size: int | None = None
    system: str | None = None
    use_chat_template: bool = True
    stop_ids: tuple[int, ...] = ()
    pan_and_scan: bool = False
    prompt_cache_file: str | os.PathLike | None = None
    draft_model: object = None  # a loaded model of the same vocabulary (mlx_gemma3.load): speculative decoding
    num_draft_tokens: int = 3
    prompt_lookup: int = 0  # draft up to this many tokens by copying from the prompt and history (0: off)
    json_schema: object = None  # the reply is JSON valid under this schema (a dict, its JSON text, a pydantic class)
    regex: str | None = None  # the reply matches this regular expression
    grammar: str | None = None  # the reply follows this Lark grammar (llguidance's dialect)
    tools: list | None = None  # functions the model may call (see processing.prompt.chat_text): chat prompts only
    chat_template_kwargs: dict | None = None  # further variables for the folder's chat template

    @classmethod
    def of(cls, options: dict) -> Options:
        """Checked options from keyword arguments; an unknown name is refused with the list of valid ones."""
        names = [f.name for f in fields(cls)]
        for name in options:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise Gemma3Error(f"unknown option {name!r}{hint}; valid options: {', '.join(names)}")
        opts = cls(**options)
        opts.check()
        return opts

    def check(self) -> None:
        for name, (fits, allowed) in OPTION_RULES.items():
            value = getattr(self, name)
            if not fits(value):
                raise Gemma3Error(f"{name} must be {allowed}, got {value!r:.80}")
        problem = sampling_problem(self.temp, self.top_k, self.top_p, self.min_p)
        if problem:
            raise Gemma3Error(problem)
        if self.draft_model is not None and self.prompt_lookup:
            raise Gemma3Error("draft_model and prompt_lookup are two ways to draft: pass one of them")
        constraints = [name for name in ("json_schema", "regex", "grammar") if getattr(self, name) is not None]
        if len(constraints) > 1:
            raise Gemma3Error(f"pass one constraint at a time, got {' and '.join(constraints)}")

    @property
    def draft_tokens(self) -> int:
        """Tokens drafted per round: 0 without speculative decoding."""
        if self.prompt_lookup:
            return self.prompt_lookup
        return self.num_draft_tokens if self.draft_model is not None else 0

    def make_cache(self, model) -> list:
        """An empty cache for `model` that can rewind a round's rejected drafts."""
        return model.make_cache(self.kv_bits, self.kv_group_size, self.max_kv_size, max(REWIND, self.draft_tokens + 1))

    @property
    def unlimited(self) -> bool:
        return self.max_tokens in UNLIMITED

    def processors(self) -> list[LogitsProcessor]:
        """The caller's logits processors, then the repetition penalty and the logit bias."""
        processors = list(self.logits_processors)
        if self.repetition_penalty is not None:
            penalty = self.repetition_penalty
            processors.append(lambda seen, logits: repetition_penalty(logits, seen[None], penalty))
        if self.logit_bias:
            bias = self.logit_bias
            processors.append(lambda seen, logits: logit_bias(logits, bias))
        return processors

    def reply_processors(self, processor) -> tuple[list[LogitsProcessor], Constraint | None]:
        """One reply's logits processors (`processors()`, then its constraint last) and that constraint (or None)."""
        constraint = self.constraint(processor)
        return [*self.processors(), *([constraint] if constraint is not None else [])], constraint

    def constraint(self, processor) -> Constraint | None:
        """A new Constraint (one per reply) for json_schema, regex or grammar; None when none is set."""
        text = grammar_text(self.json_schema, self.regex, self.grammar)
        return None if text is None else Constraint(processor, text)

    def sampler(self) -> Sampler:
        return Sampler(self.temp, self.top_k, self.top_p, self.min_p, self.seed)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


UNLIMITED = (-1, None)  # max_tokens values that mean: until the reply or the context ends
# Each option's type and range (the sampling ranges are sample.sampling_problem's): (fits, what is allowed).
OPTION_RULES = {
    "max_tokens": (
        lambda v: v in UNLIMITED or _integer(v) and v >= 1,
        "a positive integer, or -1 / None for no limit (until the reply or the context ends)",
    ),
    "temp": (_number, "a number (0 is greedy)"),
    "top_p": (_number, "a number in (0, 1]"),
    "top_k": (_integer, "an integer (0 is off)"),
    "min_p": (_number, "a number in [0, 1]"),
    "seed": (lambda v: v is None or _integer(v), "an integer or None"),
    "repetition_penalty": (lambda v: v is None or _number(v) and v > 0, "a positive number (1 is off) or None"),
    "logit_bias": (
        lambda v: v is None or isinstance(v, dict) and all(_integer(k) and _number(b) for k, b in v.items()),
        "a dict {token id: bias} or None",
    ),
    "logits_processors": (
        lambda v: isinstance(v, (list, tuple)) and all(map(callable, v)),
        "a list of callables (tokens, logits) -> logits",
    ),
    "prefill_step_size": (lambda v: _integer(v) and v >= 1, "a positive integer (prompt tokens per forward)"),
    "prefill_progress": (lambda v: v is None or callable(v), "a callable (done, total) or None"),
    "kv_bits": (lambda v: v is None or v in KV_BITS, f"None or one of {KV_BITS}"),
    "kv_group_size": (lambda v: v in GROUP_SIZES, f"one of {GROUP_SIZES}"),
    "max_kv_size": (lambda v: v is None or _integer(v) and v >= 1, "a positive number of tokens or None"),
    "system": (lambda v: v is None or isinstance(v, str), "a string or None"),
    "use_chat_template": (lambda v: isinstance(v, bool), "True or False"),
    "stop_ids": (lambda v: isinstance(v, (list, tuple, set)) and all(map(_integer, v)), "a list of token ids"),
    "pan_and_scan": (lambda v: isinstance(v, bool), "True or False"),
    "prompt_cache_file": (lambda v: v is None or isinstance(v, (str, os.PathLike)), "a file path or None"),
    "draft_model": (
        lambda v: v is None or hasattr(v, "make_cache") and hasattr(v, "config"),
        "a model from mlx_gemma3.load() or None",
    ),
    "num_draft_tokens": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "prompt_lookup": (lambda v: _integer(v) and v >= 0, "a number of tokens to draft (0 is off)"),
    "json_schema": (
        lambda v: v is None or isinstance(v, (dict, str)) or hasattr(v, "model_json_schema"),
        "a JSON schema (a dict or its JSON text), a pydantic model class, or None",
    ),
    "regex": (lambda v: v is None or isinstance(v, str) and v != "", "a regular expression or None"),
    "grammar": (lambda v: v is None or isinstance(v, str) and v != "", "a Lark grammar (text) or None"),
    "tools": (
        lambda v: v is None or isinstance(v, (list, tuple)),
        "a list of tools (functions, JSON schemas) or None",
    ),
    "chat_template_kwargs": (lambda v: v is None or isinstance(v, dict), "a dict of template variables or None"),
}


def check_model(model, processor, caller: str) -> None:
    """(model, processor) as mlx_gemma3.load returns them, or one clear error."""
    if not hasattr(model, "make_cache") or not hasattr(processor, "tokenizer") or not hasattr(processor, "config"):
        raise Gemma3Error(
            f"{caller} needs the (model, processor) pair that mlx_gemma3.load() returns, "
            f"got {type(model).__name__} and {type(processor).__name__}"
        )


def eos_ids(processor, extra: tuple[int, ...] = ()) -> set[int]:
    """Every id that ends a reply: <eos>, <end_of_turn>, the config's, the model's own (FunctionGemma's
    <start_function_response>) and the caller's."""
    return {*EOS_IDS, *processor.config.eos_token_ids, *getattr(processor, "stop_ids", ()), *extra}


def stream_generate(
    model, processor, prompt, cache=None, images=None, image_features=None, encoded_images=None, **options
) -> Iterator[GenerationResponse]:
    """Yield a GenerationResponse per new token. `prompt`: text, chat messages or token ids.

    `images` (paths, bytes, PIL images or arrays) go where the prompt has `<start_of_image>` or image items;
    `image_features` are images already encoded for the image tokens of an id prompt. With `cache`
    (from model.make_cache()), the cache must already hold the tokens before `prompt`. `encoded_images`
    (a dict) keeps encoded images by content so a later call does not encode them again.
    `prompt_cache_file`: a file holding a prompt's cache; when the new prompt starts with its tokens only the
    rest is prefilled (`reused_tokens` says how many were reused), and the file is rewritten with this prompt.
    Close the generator to cancel."""
    check_model(model, processor, "stream_generate")
    opts = Options.of(options)
    if opts.prompt_cache_file is not None:
        writable_cache_path(opts.prompt_cache_file)  # before any work: a bad path is refused up front
    with mx.stream(generation_stream()):
        ids, features = prepare_prompt(model, processor, prompt, images, opts, encoded_images)
    if image_features is not None:
        features = image_features
    if opts.prompt_cache_file is None:
        yield from generate_ids(model, processor, ids, cache, opts, features)
        return
    if cache is not None or features is not None:
        raise Gemma3Error("prompt_cache_file takes a text prompt and makes its own cache: pass no cache or images")
    path = Path(opts.prompt_cache_file)
    new_cache = lambda: opts.make_cache(model)  # noqa: E731
    cache, held = reusable_cache(path, ids, new_cache)
    opts.prefill_progress = saving_when_prefilled(path, cache, ids, opts.prefill_progress)
    yield from generate_ids(model, processor, ids[len(held) :], cache, opts, None, held)


def prepare_prompt(model, processor, prompt, images, opts: Options, encoded: dict | None = None):
    """(token ids, image features or None): images preprocessed, encoded and their placeholders expanded."""
    sources = [*image_sources(prompt), *(images or [])]
    chat = dict(tools=opts.tools, template_kwargs=opts.chat_template_kwargs)
    if not sources:
        return prompt_ids(processor, prompt, opts.system, opts.use_chat_template, **chat), None
    vision = model.config.vision
    if vision is None:
        raise Gemma3Error(TEXT_ONLY)
    pixels, crops = process_images(sources, vision.image_size, opts.pan_and_scan)
    ids = prompt_ids(processor, prompt, opts.system, opts.use_chat_template, crops, vision.tokens_per_image, **chat)
    return ids, encode_images(model, pixels, {} if encoded is None else encoded)


def image_sources(prompt) -> list:
    """Images named by chat content items ({"type": "image", "image"/"url"/"path": ...}), in order."""
    if not isinstance(prompt, list):
        return []
    items = [i for m in prompt if isinstance(m, dict) and isinstance(m.get("content"), list) for i in m["content"]]
    found = [
        next((i[k] for k in ("image", "url", "path") if i.get(k) is not None), None)
        for i in items
        if isinstance(i, dict) and i.get("type") == "image"
    ]
    return [source for source in found if source is not None]


def encode_images(model, pixels: np.ndarray, encoded: dict) -> mx.array:
    """Image features [N, tokens, hidden]; an image already in `encoded` (keyed by a hash of its pixels) is reused."""
    keys = [hashlib.sha256(image.tobytes()).hexdigest() for image in pixels]
    new = [i for i, key in enumerate(keys) if key not in encoded]
    if new:
        features = model.encode_images(mx.array(pixels[new]))
        mx.eval(features)
        encoded.update({keys[i]: features[j] for j, i in enumerate(new)})
    return mx.stack([encoded[key] for key in keys])


def generate_ids(
    model, processor, ids: list[int], cache, opts: Options, features=None, history: list[int] = (), draft_cache=None
) -> Iterator[GenerationResponse]:
    """Generation from token ids (and the features of their images); `history`: the tokens `cache` already holds;
    `draft_cache`: the draft model's cache (a prefix of `history`, or None for a new one)."""
    cache = cache if cache is not None else opts.make_cache(model)
    context = model.config.text.max_position_embeddings
    start = cache[0].offset
    if opts.max_kv_size is None and start + len(ids) >= context:
        raise Gemma3Error(
            f"the prompt is {start + len(ids)} tokens; the model's context is {context}: shorten the prompt"
        )
    max_tokens = token_budget(opts, context - start - len(ids))
    processors, constraint = opts.reply_processors(processor)
    step_options = dict(
        sampler=opts.sampler(),
        logits_processors=processors,
        prefill_step_size=opts.prefill_step_size,
        image_features=features,
        history=history,
        max_tokens=max_tokens,
        progress=opts.prefill_progress,
    )
    if opts.draft_tokens:
        steps = speculative_steps(model, ids, cache, opts, draft_cache, step_options)
    else:
        steps = generate_step(model, ids, cache, **step_options)
    detokenizer = processor.tokenizer.detokenizer() if processor.tokenizer else None
    with closing(steps):  # close it here, in this thread, not whenever it is garbage collected
        yield from _responses(
            steps, ids, detokenizer, eos_ids(processor, opts.stop_ids), max_tokens, len(history), constraint
        )


def speculative_steps(model, ids: list[int], cache, opts: Options, draft_cache, step_options: dict):
    """speculative_generate_step for these options (a draft model's cache is made here when none is given)."""
    if cache[0].offset != len(step_options["history"]):
        raise Gemma3Error(
            "speculative decoding needs every token the cache holds: pass no cache, or use Chat across turns"
        )
    draft = opts.draft_model
    if draft is not None and draft_cache is None:
        draft_cache = opts.make_cache(draft)
    return speculative_generate_step(
        model, draft, ids, cache, draft_cache, num_draft_tokens=opts.draft_tokens, **step_options
    )


def token_budget(opts: Options, room: int) -> int | None:
    """Most tokens to generate: max_tokens within the room the context leaves; no limit means all that room
    (or, with a rotating max_kv_size cache, which has no end, until the reply ends)."""
    if opts.max_kv_size is not None:
        return None if opts.unlimited else opts.max_tokens
    return room if opts.unlimited else min(opts.max_tokens, room)


def _responses(
    steps,
    ids: list[int],
    detokenizer,
    stop: set[int],
    max_tokens: int | None,
    reused: int,
    constraint: Constraint | None = None,
):
    tic, prompt_tps = time.perf_counter(), 0.0
    for n, (token, logprobs, *from_draft) in enumerate(steps, start=1):
        if n == 1:
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        text, finish = reply_piece(token, n, detokenizer, stop, max_tokens, constraint)
        rate = (n - 1) / max(time.perf_counter() - tic, 1e-9) if n > 1 else 0.0
        yield GenerationResponse(
            text,
            token,
            finish,
            len(ids),
            prompt_tps,
            n,
            rate,
            mx.get_peak_memory() / 1e9,
            logprobs,
            reused,
            bool(from_draft and from_draft[0]),
        )
        if finish:
            return


def reply_piece(
    token: int, n: int, detokenizer, stop: set[int], max_tokens: int | None, constraint: Constraint | None = None
) -> tuple[str, str | None]:
    """The text the n-th token adds, and why the reply ends with it ("stop", "length", "dead_end" when the
    constraint allowed nothing else; None: it goes on)."""
    finish = "stop" if token in stop else "length" if n == max_tokens else None
    if finish == "stop" and constraint is not None and constraint.dead_end is not None:
        finish = DEAD_END
    text = "" if detokenizer is None or token in stop else detokenizer.add(token)
    if finish and detokenizer is not None:
        text += detokenizer.finish()
    return text, finish


def generate(model, processor, prompt, **options) -> str:
    """The whole reply as one string."""
    return "".join(response.text for response in stream_generate(model, processor, prompt, **options))

"""stream_generate and generate: prompts and images in, text out, with stops and statistics over generate_step."""

from __future__ import annotations

import hashlib
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
import numpy as np

from ..errors import Gemma3Error
from ..model.quantize import DEFAULT_GROUP_SIZE
from ..processing.image import process_images
from ..processing.prompt import prompt_ids
from ..processing.tokenizer import EOS_IDS
from .sample import Sampler, logit_bias, repetition_penalty
from .step import PREFILL_STEP_SIZE, LogitsProcessor, generate_step
from .streams import generation_stream


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


@dataclass
class Options:
    """Everything stream_generate accepts besides the model, processor and prompt."""

    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    prefill_step_size: int = PREFILL_STEP_SIZE
    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_GROUP_SIZE
    max_kv_size: int | None = None
    system: str | None = None
    use_chat_template: bool = True
    stop_ids: tuple[int, ...] = ()
    pan_and_scan: bool = False

    def check(self) -> None:
        if self.max_tokens < 1 or self.prefill_step_size < 1:
            raise Gemma3Error("max_tokens and prefill_step_size must be at least 1")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise Gemma3Error(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        try:
            self.sampler()
        except ValueError as e:
            raise Gemma3Error(f"bad sampling option: {e}") from None

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

    def sampler(self) -> Sampler:
        return Sampler(self.temp, self.top_k, self.top_p, self.min_p, self.seed)


def eos_ids(processor, extra: tuple[int, ...] = ()) -> set[int]:
    """Every id that ends a reply: <eos>, <end_of_turn>, the config's and the caller's."""
    return {*EOS_IDS, *processor.config.eos_token_ids, *extra}


def stream_generate(
    model, processor, prompt, cache=None, images=None, image_features=None, encoded_images=None, **options
) -> Iterator[GenerationResponse]:
    """Yield a GenerationResponse per new token. `prompt`: text, chat messages or token ids.

    `images` (paths, bytes, PIL images or arrays) go where the prompt has `<start_of_image>` or image items;
    `image_features` are images already encoded for the image tokens of an id prompt. With `cache`
    (from model.make_cache()), the cache must already hold the tokens before `prompt`. `encoded_images`
    (a dict) keeps encoded images by content so a later call does not encode them again.
    Close the generator to cancel."""
    opts = Options(**options)
    opts.check()
    with mx.stream(generation_stream()):
        ids, features = prepare_prompt(model, processor, prompt, images, opts, encoded_images)
    if image_features is not None:
        features = image_features
    yield from generate_ids(model, processor, ids, cache, opts, features)


def prepare_prompt(model, processor, prompt, images, opts: Options, encoded: dict | None = None):
    """(token ids, image features or None): images preprocessed, encoded and their placeholders expanded."""
    sources = [*image_sources(prompt), *(images or [])]
    if not sources:
        return prompt_ids(processor, prompt, opts.system, opts.use_chat_template), None
    vision = model.config.vision
    if vision is None:
        raise Gemma3Error("this model reads text only: images need a Gemma 3 4B, 12B or 27B (multimodal) model")
    pixels, crops = process_images(sources, vision.image_size, opts.pan_and_scan)
    ids = prompt_ids(processor, prompt, opts.system, opts.use_chat_template, crops, vision.tokens_per_image)
    return ids, encode_images(model, pixels, {} if encoded is None else encoded)


def image_sources(prompt) -> list:
    """Images named by chat content items ({"type": "image", "image"/"url"/"path": ...}), in order."""
    if not isinstance(prompt, list):
        return []
    items = [i for m in prompt if isinstance(m, dict) and isinstance(m.get("content"), list) for i in m["content"]]
    found = [next((i[k] for k in ("image", "url", "path") if i.get(k) is not None), None) for i in items
             if isinstance(i, dict) and i.get("type") == "image"]
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
    model, processor, ids: list[int], cache, opts: Options, features=None, history: list[int] = ()
) -> Iterator[GenerationResponse]:
    """Generation from token ids (and the features of their images); `history`: the tokens `cache` already holds."""
    cache = cache if cache is not None else model.make_cache(opts.kv_bits, opts.kv_group_size, opts.max_kv_size)
    context = model.config.text.max_position_embeddings
    start = cache[0].offset
    if opts.max_kv_size is None and start + len(ids) >= context:
        raise Gemma3Error(
            f"the prompt is {start + len(ids)} tokens; the model's context is {context}: shorten the prompt"
        )
    max_tokens = min(opts.max_tokens, context - start - len(ids)) if opts.max_kv_size is None else opts.max_tokens
    steps = generate_step(
        model, ids, cache, sampler=opts.sampler(), logits_processors=opts.processors(),
        prefill_step_size=opts.prefill_step_size, image_features=features, history=history, max_tokens=max_tokens,
    )
    detokenizer = processor.tokenizer.detokenizer() if processor.tokenizer else None
    with closing(steps):  # close it here, in this thread, not whenever it is garbage collected
        yield from _responses(steps, ids, detokenizer, eos_ids(processor, opts.stop_ids), max_tokens)


def _responses(steps, ids: list[int], detokenizer, stop: set[int], max_tokens: int):
    tic, prompt_tps = time.perf_counter(), 0.0
    for n, (token, logprobs) in enumerate(steps, start=1):
        if n == 1:
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        finish = "stop" if token in stop else "length" if n == max_tokens else None
        text = "" if detokenizer is None or token in stop else detokenizer.add(token)
        if finish and detokenizer is not None:
            text += detokenizer.finish()
        rate = (n - 1) / max(time.perf_counter() - tic, 1e-9) if n > 1 else 0.0
        yield GenerationResponse(text, token, finish, len(ids), prompt_tps, n, rate, mx.get_peak_memory() / 1e9, logprobs)
        if finish:
            return


def generate(model, processor, prompt, **options) -> str:
    """The whole reply as one string."""
    return "".join(response.text for response in stream_generate(model, processor, prompt, **options))


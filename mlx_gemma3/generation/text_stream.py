"""stream_generate and generate: prompts and images in, text out, with stops and statistics over generate_step.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import Gemma3Error
from ..model.cache import writable_cache_path
from ..model.text import TEXT_ONLY
from ..processing.image import process_images
from ..processing.prompt import prompt_ids
from .options import Options
from .prefix_reuse import image_digests
from .prompt_file import reusable_cache, saving_when_prefilled
from .reply import Reply
from .speculative import speculative_generate_step
from .step import generate_step
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
    finish_detail: str | None = None  # why a constrained reply ended with "length": no valid reply fitted max_tokens


def check_model(model, processor, caller: str) -> None:
    """(model, processor) as mlx_gemma3.load returns them, or one clear error."""
    if not hasattr(model, "make_cache") or not hasattr(processor, "tokenizer") or not hasattr(processor, "config"):
        raise Gemma3Error(
            f"{caller} needs the (model, processor) pair that mlx_gemma3.load() returns, "
            f"got {type(model).__name__} and {type(processor).__name__}"
        )


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
    opts = replace(opts, prefill_progress=saving_when_prefilled(path, cache, ids, opts.prefill_progress))
    yield from generate_ids(model, processor, ids[len(held) :], cache, opts, None, held)


def prepare_prompt(model, processor, prompt, images, opts: Options, encoded: dict | None = None):
    """(token ids, image features or None): images preprocessed, encoded and their placeholders expanded."""
    ids, pixels = render_prompt(model, processor, prompt, images, opts)
    return ids, None if pixels is None else encode_images(model, pixels, {} if encoded is None else encoded)


def render_prompt(model, processor, prompt, images, opts: Options) -> tuple[list[int], np.ndarray | None]:
    """(token ids, the images' pixels or None): images preprocessed and their placeholders expanded."""
    sources = [*image_sources(prompt), *(images or [])]
    chat = dict(tools=opts.tools, template_kwargs=opts.chat_template_kwargs)
    if not sources:
        return prompt_ids(processor, prompt, opts.system, opts.use_chat_template, **chat), None
    vision = model.config.vision
    if vision is None:
        raise Gemma3Error(TEXT_ONLY)
    pixels, crops = process_images(sources, vision.image_size, opts.pan_and_scan)
    return prompt_ids(
        processor, prompt, opts.system, opts.use_chat_template, crops, vision.tokens_per_image, **chat
    ), pixels


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
    keys = image_digests(pixels)
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
    reply = Reply(processor, opts, context - start - len(ids))
    step_options = dict(
        sampler=opts.sampler(),
        logits_processors=reply.processors,
        prefill_step_size=opts.prefill_step_size,
        image_features=features,
        history=history,
        max_tokens=reply.max_tokens,
        progress=opts.prefill_progress,
    )
    if opts.draft_tokens:
        steps = speculative_steps(model, ids, cache, opts, draft_cache, step_options)
    else:
        steps = generate_step(model, ids, cache, **step_options)
    with closing(steps):  # close it here, in this thread, not whenever it is garbage collected
        yield from _responses(steps, ids, reply, len(history))


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


def _responses(steps, ids: list[int], reply: Reply, reused: int):
    tic, prompt_tps = time.perf_counter(), 0.0
    for n, (token, logprobs, *from_draft) in enumerate(steps, start=1):
        if n == 1:
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        text = reply.add(token)
        rate = (n - 1) / max(time.perf_counter() - tic, 1e-9) if n > 1 else 0.0
        yield GenerationResponse(
            text,
            token,
            reply.finish,
            len(ids),
            prompt_tps,
            n,
            rate,
            mx.get_peak_memory() / 1e9,
            logprobs,
            reused,
            bool(from_draft and from_draft[0]),
            reply.finish_detail,
        )
        if reply.finish:
            return


def generate(model, processor, prompt, **options) -> str:
    """The whole reply as one string."""
    return "".join(response.text for response in stream_generate(model, processor, prompt, **options))

"""Multi-turn chat that keeps its KV cache between turns (the `Chat` class).

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx

from ..errors import Gemma3Error
from ..model.cache import load_prompt_cache, same_layers, save_prompt_cache
from .options import Options
from .prefix_reuse import held_keys, image_digests, prompt_keys, reusable, token_ids, trimmed
from .step import image_runs
from .text_stream import GenerationResponse, check_model, encode_images, generate_ids, render_prompt
from .thread_streams import generation_stream

CACHE_OPTIONS = ("kv_bits", "kv_group_size", "max_kv_size")


class Chat:
    """A conversation with a model; each turn prefills only what the cache does not already hold."""

    def __init__(self, model, processor, system: str | None = None, **options):
        check_model(model, processor, "Chat")
        Options.of({**options, "system": system})
        if options.get("prompt_cache_file") is not None:
            raise Gemma3Error(
                "a Chat keeps its own cache: use chat.save(path) and chat.load(path), not prompt_cache_file"
            )
        self.model, self.processor, self.options = model, processor, options
        self.system = system
        self.messages: list[dict] = []
        self.encoded_images: dict = {}  # image features by content hash: an image is encoded once per chat
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = []
        self.cache = Options.of(self.options).make_cache(self.model)
        self.cached_keys: list[int] = []  # what the cache holds, as prefix_reuse's keys (images by content)
        self.reset_draft_cache()

    def reset_draft_cache(self) -> None:
        """The draft model's cache (speculative decoding), a prefix of `cached_keys`; it catches up when behind."""
        opts = Options.of(self.options)
        self.draft_cache = None if opts.draft_model is None else opts.make_cache(opts.draft_model)

    def set_system(self, system: str | None) -> None:
        """A new system prompt starts a new conversation."""
        Options.of({"system": system})
        self.system = system
        self.reset()

    def conversation(self, *new_turns: dict) -> list[dict]:
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        return [*system, *self.messages, *new_turns]

    def stream(self, content, images=None, **options) -> Iterator[GenerationResponse]:
        """Send one user turn (text or content items, plus optional `images` shown before the text);
        yields the reply as it is generated. `options` override the chat's options for this turn only."""
        if images:
            text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            content = [*({"type": "image", "image": image} for image in images), *text]
        user = {"role": "user", "content": content}
        opts = Options.of({**self.options, **options})
        ids, pixels = render_prompt(self.model, self.processor, self.conversation(user), None, opts)
        keys = prompt_keys(ids, self.image_token, image_digests(pixels))
        reused = self._reuse(keys)
        features = None
        if pixels is not None:
            seen = sum(first < reused for first, _ in image_runs(ids, self.image_token))  # images already in the cache
            if seen < len(pixels):
                with mx.stream(generation_stream()):
                    features = encode_images(self.model, pixels[seen:], self.encoded_images)
        reply, tokens = [], []
        draft_cache = self.draft_cache if opts.draft_model is self.options.get("draft_model") else None
        try:
            for response in generate_ids(
                self.model, self.processor, ids[reused:], self.cache, opts, features, ids[:reused], draft_cache
            ):
                reply.append(response.text)
                tokens.append(response.token)
                yield response
        finally:
            self._settle([*keys, *tokens])
            if tokens:
                self.messages += [user, {"role": "assistant", "content": "".join(reply)}]

    def send(self, content, **options) -> str:
        """Send one user turn and return the whole reply."""
        return "".join(response.text for response in self.stream(content, **options))

    @property
    def image_token(self) -> int | None:
        vision = self.model.config.vision
        return None if vision is None else vision.image_token_id

    def _reuse(self, keys: list[int]) -> int:
        """Trim the cache back to what it shares with `keys` (prefix_reuse.reusable), or start over when it cannot
        serve any of it; returns how many tokens it holds."""
        n = reusable(self.cache, self.cached_keys, keys)
        if n:
            self.cache, self.cached_keys = trimmed(self.cache, self.cached_keys, n)
        elif self.cached_keys:
            self.reset_cache()
        self._trim_draft(n)
        return n

    def _trim_draft(self, length: int) -> None:
        """The draft cache holds at most the first `length` tokens (or starts over when it cannot rewind)."""
        if self.draft_cache is None:
            return
        surplus = self.draft_cache[0].offset - length
        if surplus > 0 and not all(layer.is_trimmable(surplus) for layer in self.draft_cache):
            self.reset_draft_cache()
        elif surplus > 0:
            for layer in self.draft_cache:
                layer.trim(surplus)

    def _settle(self, keys: list[int]) -> None:
        """Record which of `keys` (the prompt's and the reply's) the cache now holds; an interrupted step leaves
        layers out of step: start over then."""
        held = held_keys(self.cache, keys)
        if held is None:
            self.reset_cache()
        else:
            self.cached_keys = held

    def reset_cache(self) -> None:
        messages = self.messages
        self.reset()
        self.messages = messages

    def save(self, path) -> None:
        """Write the cache, its tokens and the conversation to one safetensors file."""
        for message in self.messages:
            for item in message["content"] if isinstance(message["content"], list) else []:
                if item.get("type") == "image" and not isinstance(item.get("image", item.get("path", "")), str):
                    raise Gemma3Error("a chat whose images are not file paths cannot be saved: pass images as paths")
        extra = {"messages": self.messages, "system": self.system}
        save_prompt_cache(path, self.cache, token_ids(self.cached_keys, self.image_token), extra=extra)

    def load(self, path) -> None:
        """Continue a conversation saved by `save` (with the same model)."""
        cache, ids, extra = load_prompt_cache(path)
        expected = self.model.make_cache(**{k: self.options[k] for k in CACHE_OPTIONS if k in self.options})
        if not same_layers(cache, expected) or "messages" not in extra:
            raise Gemma3Error(f"{path} was saved from a different model or is not a chat: it does not fit this model")
        self.cache, self.cached_keys = cache, ids  # an image's tokens (its id, not its key) match no new image
        self.messages, self.system = extra["messages"], extra.get("system")
        self.reset_draft_cache()

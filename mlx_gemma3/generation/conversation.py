"""Multi-turn chat that keeps its KV cache between turns (the `Chat` class).

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx

from ..errors import Gemma3Error
from ..model.cache import load_prompt_cache, same_layers, save_prompt_cache
from .step import image_runs
from .text_stream import GenerationResponse, Options, check_model, generate_ids, prepare_prompt
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
        self.cached_ids: list[int] = []
        self.reset_draft_cache()

    def reset_draft_cache(self) -> None:
        """The draft model's cache (speculative decoding), a prefix of `cached_ids`; it catches up when behind."""
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
        with mx.stream(generation_stream()):
            ids, features = prepare_prompt(
                self.model, self.processor, self.conversation(user), None, opts, self.encoded_images
            )
        reused = self._reuse(ids, features is not None)
        if features is not None:
            features = features[sum(first < reused for first, _ in self._runs(ids)) :]
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
            self._settle(ids, tokens)
            if tokens:
                self.messages += [user, {"role": "assistant", "content": "".join(reply)}]

    def send(self, content, **options) -> str:
        """Send one user turn and return the whole reply."""
        return "".join(response.text for response in self.stream(content, **options))

    def _runs(self, ids: list[int]) -> list[tuple[int, int]]:
        return image_runs(ids, self.model.config.vision.image_token_id)

    def _reuse(self, ids: list[int], has_images: bool) -> int:
        """Trim the cache back to its common prefix with `ids` (keeping ≥ 1 token to feed, never ending inside
        an image); returns its length."""
        common = 0
        for cached, new in zip(self.cached_ids, ids[:-1]):
            if cached != new:
                break
            common += 1
        for first, last in self._runs(ids) if has_images else []:
            if first < common < last:
                common = first
        surplus = len(self.cached_ids) - common
        if not all(layer.is_trimmable(surplus) for layer in self.cache):
            self.reset_cache()
            return 0
        for layer in self.cache:
            layer.trim(surplus)
        self.cached_ids = self.cached_ids[:common]
        self._trim_draft(common)
        return common

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

    def _settle(self, ids: list[int], tokens: list[int]) -> None:
        """Record which tokens the cache now holds; an interrupted step leaves layers out of step → start over."""
        offsets = {layer.offset for layer in self.cache}
        held = offsets.pop() if len(offsets) == 1 else -1
        if held < 0 or held > len(ids) + len(tokens):
            self.reset_cache()
        else:
            self.cached_ids = (ids + tokens)[:held]

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
        save_prompt_cache(path, self.cache, self.cached_ids, extra=extra)

    def load(self, path) -> None:
        """Continue a conversation saved by `save` (with the same model)."""
        cache, ids, extra = load_prompt_cache(path)
        expected = self.model.make_cache(**{k: self.options[k] for k in CACHE_OPTIONS if k in self.options})
        if not same_layers(cache, expected) or "messages" not in extra:
            raise Gemma3Error(f"{path} was saved from a different model or is not a chat: it does not fit this model")
        self.cache, self.cached_ids = cache, ids
        self.messages, self.system = extra["messages"], extra.get("system")
        self.reset_draft_cache()

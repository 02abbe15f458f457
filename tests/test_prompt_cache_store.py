"""The server's prompt cache across requests: the store's choice, and replies identical to a server without it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_server_safety import client, loaded, serving  # noqa: F401 — `loaded` is a fixture

from mlx_gemma3.processing.prompt import prompt_ids
from mlx_gemma3.serve.prompt_cache import Entry, PromptCacheStore, best_candidate

LAYOUT = (None, 64, 0)


class Layer:
    """A cache layer that can forget its last `rewind` tokens (everything, with rewind None)."""

    def __init__(self, offset: int, rewind: int | None = None, nbytes: int = 100):
        self.offset, self.rewind, self.nbytes = offset, rewind, nbytes

    def is_trimmable(self, n: int) -> bool:
        return n <= (self.offset if self.rewind is None else self.rewind)

    def trim(self, n: int) -> int:
        self.offset -= n
        return n


def entry(ids, rewind=None, checkpoint_ids=None, nbytes=100, layout=LAYOUT) -> Entry:
    checkpoint = [Layer(len(checkpoint_ids), rewind, nbytes)] if checkpoint_ids is not None else None
    return Entry(layout, list(ids), [Layer(len(ids), rewind, nbytes)], checkpoint, checkpoint_ids)


def store_of(*entries, size=4, nbytes=10_000) -> PromptCacheStore:
    store = PromptCacheStore(size, nbytes)
    for e in entries:
        store.put(e)
    return store


def test_longest_common_prefix_wins_and_leaves_a_token_to_feed():
    store = store_of(entry([1, 2, 3]), entry([1, 2, 3, 4, 5, 9]), entry([1, 7]))
    cache, held = store.take(LAYOUT, [1, 2, 3, 4, 5, 6])
    assert held == [1, 2, 3, 4, 5] and cache[0].offset == 5  # trimmed back from 6 tokens
    assert len(store.entries) == 2  # taken out while in use (it had no checkpoint to leave behind)
    cache, held = store.take(LAYOUT, [1, 2, 3])
    assert held == [1, 2] and cache[0].offset == 2  # the whole prompt is never reused: one token is fed


def test_trim_then_checkpoint_then_nothing():
    ids = list(range(40))
    # the cache rewinds 4 tokens: enough for a reply re-rendered differently in its last tokens
    assert best_candidate(store_of(entry([*ids[:30], 99, 98], 4, ids[:20])).entries.items(), LAYOUT, ids)[2] == "cache"
    # an earlier message edited: the cache cannot rewind that far, its prompt-end checkpoint is a prefix
    edited = [*ids[:25], 77, *ids[26:]]
    store = store_of(entry(ids[:35], 4, ids[:20]))
    cache, held = store.take(LAYOUT, edited)
    assert held == ids[:20] and cache[0].offset == 20
    assert [e.ids for e in store.entries.values()] == [ids[:35]] and store.entries[0].checkpoint is None
    # neither rewinds to the prefix: nothing is reused (the entry stays)
    store = store_of(entry(ids[:35], 4, ids[:20]))
    assert store.take(LAYOUT, [*ids[:10], 55]) == (None, []) and len(store.entries) == 1
    # another cache layout (kv_bits) is never used
    assert store_of(entry(ids[:30], layout=(4, 64, 0))).take(LAYOUT, ids) == (None, [])


def test_least_recently_used_evicted_by_count_and_bytes():
    a, b, c = entry([1, 1]), entry([2, 2]), entry([3, 3])
    store = store_of(a, b, c, size=2)
    assert list(store.entries.values()) == [b, c]
    store = store_of(a, b, c, nbytes=250)  # 100 bytes each
    assert list(store.entries.values()) == [b, c]
    store.take(LAYOUT, [2, 2, 5])  # b in use, then kept again as the most recent
    store.put(b)
    store.put(entry([4, 4]))
    assert [e.ids for e in store.entries.values()] == [[2, 2], [4, 4]]
    assert not PromptCacheStore(0, 100).enabled and not PromptCacheStore(4, 0).enabled


WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing about rivers and hills".split()


def message(turn: int, n: int = 30) -> str:
    return " ".join(WORDS[(turn * 7 + i) % len(WORDS)] for i in range(n))


def ask(port: int, messages: list[dict], max_tokens: int = 12):
    reply = client(port).chat.completions.create(
        model="tiny", messages=messages, max_tokens=max_tokens, temperature=0, logprobs=True
    )
    choice = reply.choices[0]
    return choice.message.content, choice.logprobs.content[0].logprob, reply.usage


class PlainText:
    """A logits processor keeping the tiny model's replies to whole words, not starting with a space, which the
    chat template trims away when the reply comes back as an assistant message (a real model's replies do not
    start with one, nor are they lone bytes of broken characters)."""

    def __init__(self, processor):
        tokenizer = processor.tokenizer
        self.after = tokenizer.encode("<start_of_turn>model\n", add_bos=False)[-2:]
        pieces = [tokenizer.decode([0, i])[len(tokenizer.decode([0])) :] for i in range(tokenizer.vocab_size)]
        self.always = np.array([-1e9 if "\ufffd" in p else 0.0 for p in pieces], np.float32)
        self.first = np.array([-1e9 if p[:1].isspace() else 0.0 for p in pieces], np.float32) + self.always

    def __call__(self, tokens, logits):  # the masks become arrays here, on the worker's thread
        mask = self.first if tokens.size >= 2 and tokens[-2:].tolist() == self.after else self.always
        return logits + mx.array(mask[: logits.shape[-1]])


@pytest.mark.slow
def test_conversation_identical_to_no_prompt_cache_past_the_sliding_window(loaded):  # noqa: F811
    processors = {"logits_processors": [PlainText(loaded[1])]}
    cached, _ = serving(loaded, extra_options=dict(processors))
    plain, _ = serving(loaded, prompt_cache_size=0, extra_options=dict(processors))
    try:
        history, turns = [], []

        def turn(messages, kind):
            got = ask(cached.server_address[1], messages)
            want = ask(plain.server_address[1], messages)
            assert got[0] == want[0], kind
            assert abs(got[1] - want[1]) < 1e-4, kind
            assert want[2].prompt_tokens_details.cached_tokens == 0
            assert got[2].prompt_tokens == want[2].prompt_tokens
            turns.append((kind, got[2]))
            return got[0]

        def next_turn(n):
            history.append({"role": "user", "content": message(n)})
            history.append({"role": "assistant", "content": turn(list(history), "next")})

        for n in range(3):
            next_turn(n)
        regenerated = turn(history[:-1], "regenerate")
        assert regenerated == history[-1]["content"]
        edited = [
            *history[:2],
            {"role": "user", "content": message(9)},
            *history[3:],
            {"role": "user", "content": "ok"},
        ]
        turn(edited, "edit")
        next_turn(3)
        next_turn(4)
        assert len(turns) == 7 and turns[-1][1].prompt_tokens > 150  # far past the window of 16
        previous = None
        for kind, usage in turns:
            if kind == "next" and previous is not None:  # the previous turn's prompt: most of the conversation
                assert usage.prompt_tokens_details.cached_tokens >= previous.prompt_tokens, turns
            if kind == "next":
                previous = usage
        assert turns[3][1].prompt_tokens_details.cached_tokens > 0  # the regenerated reply reused its prompt
        assert turns[4][1].prompt_tokens_details.cached_tokens > 0  # the edit: the first turn's checkpoint
    finally:
        for httpd in (cached, plain):
            httpd.shutdown()
            httpd.server_close()


class Reply:
    """A logits processor making every reply `text`, tokenized as the chat template renders it back."""

    def __init__(self, processor, text: str):
        tokenizer = processor.tokenizer
        self.after = tokenizer.encode("<start_of_turn>model\n", add_bos=False)[-2:]
        ids = prompt_ids(processor, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}])
        start = min(i + 2 for i in range(len(ids) - 1) if ids[i : i + 2] == self.after)
        self.ids = [*ids[start : ids.index(106, start)], 106]

    def start(self, ids: list[int]) -> int:
        return max(i + 2 for i in range(len(ids) - 1) if ids[i : i + 2] == self.after)

    def __call__(self, tokens, logits):
        step = min(tokens.size - self.start(tokens.tolist()), len(self.ids) - 1)
        return mx.where(mx.arange(logits.shape[-1]) == self.ids[step], 1e4, logits)


@pytest.mark.slow
def test_next_turns_reuse_the_previous_reply_too(loaded):  # noqa: F811
    reply = Reply(loaded[1], "the lazy dog sings about rivers")
    httpd, _ = serving(loaded, extra_options={"logits_processors": [reply]})
    try:
        history, usages = [], []
        for n in range(4):
            history.append({"role": "user", "content": message(n)})
            text, _, usage = ask(httpd.server_address[1], history, 40)
            assert text == "the lazy dog sings about rivers" and usage.prompt_tokens > 100 * (n + 1)
            history.append({"role": "assistant", "content": text})
            usages.append(usage)
        for before, after in zip(usages, usages[1:]):  # all of the previous prompt and reply but its last token
            assert after.prompt_tokens_details.cached_tokens >= before.prompt_tokens + before.completion_tokens - 1
    finally:
        httpd.shutdown()
        httpd.server_close()


def image_turn(color: str, text: str) -> dict:
    from test_server_batch import data_url

    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": data_url(color)}}, {"type": "text", "text": text}],
    }


@pytest.mark.slow
def test_an_image_conversation_reuses_its_image_next_turn_and_never_another(image_chat_model):
    from mlx_gemma3.serve.requests import to_gemma_messages

    _, model, processor, _, _ = image_chat_model
    options = {"logits_processors": [PlainText(processor)]}
    cached, _ = serving((model, processor), extra_options=dict(options))
    plain, _ = serving((model, processor), prompt_cache_size=0, extra_options=dict(options))
    try:
        first = [image_turn("teal", "What is this?")]
        vision = model.config.vision
        image_at = prompt_ids(processor, to_gemma_messages(first), None, True, [0], vision.tokens_per_image).index(
            vision.image_token_id
        )

        def turn(messages):
            got = ask(cached.server_address[1], messages, 8)
            want = ask(plain.server_address[1], messages, 8)
            assert got[0] == want[0] and abs(got[1] - want[1]) < 1e-4
            return got

        text, _, usage = turn(first)
        assert usage.prompt_tokens_details.cached_tokens == 0
        second = [*first, {"role": "assistant", "content": text}, {"role": "user", "content": "And its colour?"}]
        _, _, next_usage = turn(second)
        # the first turn's whole prompt, its image included, came from the prompt cache
        assert (
            next_usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens > image_at + vision.tokens_per_image
        )
        # the same conversation about another picture (same token ids) reuses nothing from the image on
        other = [image_turn("orange", "What is this?"), *second[1:]]
        _, _, other_usage = turn(other)
        assert other_usage.prompt_tokens_details.cached_tokens <= image_at  # (the window of 16 slid: none here)
    finally:
        for httpd in (cached, plain):
            httpd.shutdown()
            httpd.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"max_kv_size": 40}, {"prompt_lookup": 3}], ids=["max_kv_size", "speculative"])
def test_bounded_and_speculative_requests_reuse_the_prompt_cache_exactly(loaded, options):  # noqa: F811
    extra = {"logits_processors": [PlainText(loaded[1])], **options}
    cached, _ = serving(loaded, extra_options=dict(extra))
    plain, _ = serving(loaded, prompt_cache_size=0, extra_options=dict(extra))
    try:
        history, usages = [], []
        for n in range(3):
            history.append({"role": "user", "content": message(n, 12)})
            got = ask(cached.server_address[1], history)
            want = ask(plain.server_address[1], history)
            assert got[0] == want[0] and abs(got[1] - want[1]) < 1e-4
            history.append({"role": "assistant", "content": got[0]})
            usages.append(got[2])
        assert usages[-1].prompt_tokens > 40  # past the bounded cache's size and the window of 16
        for before, after in zip(usages, usages[1:]):  # the previous turn's whole prompt came from the cache
            assert after.prompt_tokens_details.cached_tokens >= before.prompt_tokens
    finally:
        for httpd in (cached, plain):
            httpd.shutdown()
            httpd.server_close()

"""EmbeddingGemma's inputs: the task prompt in front of each text (a document's title in its prompt), then the
tokens cut to the model's length limit with the tokenizer's own <bos>/<eos>, as sentence-transformers encodes them.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import Gemma3Error
from ..model.embedding_model import SentenceConfig
from .tokenizer import BOS_ID, EOS_ID, Tokenizer

UNTITLED = "title: none | "  # how EmbeddingGemma's document prompt starts: the title slot, empty


def task_prompt(sentence: SentenceConfig, task: str | None) -> str:
    """The prompt a task names (a key of config_sentence_transformers.json's prompts, in any letter case); without
    a task, the model's default prompt, if it names one, else none."""
    if task is None:
        return sentence.prompts.get(sentence.default_prompt_name, "") if sentence.default_prompt_name else ""
    if not isinstance(task, str):
        raise Gemma3Error(f"task must be a string, got {type(task).__name__}")
    if task in sentence.prompts:
        return sentence.prompts[task]
    folded = {name.casefold(): prompt for name, prompt in sentence.prompts.items()}
    if task.casefold() in folded:
        return folded[task.casefold()]
    known = ", ".join(sentence.prompts) or "none: this model has no prompts"
    raise Gemma3Error(f"unknown task {task!r}; this model's tasks: {known}")


def titled(prompt: str, title: str | None) -> str:
    """The document prompt with `title` in its title slot (`title: none | text: ` → `title: T | text: `)."""
    if title is None:
        return prompt
    if not isinstance(title, str):
        raise Gemma3Error(f"a title must be a string, got {type(title).__name__}")
    if not prompt.startswith(UNTITLED):
        raise Gemma3Error("a title goes with the document task (task='document'), whose prompt has a title slot")
    return f"title: {title} | " + prompt[len(UNTITLED) :]


def embedding_ids(
    tokenizer: Tokenizer,
    ends: tuple[bool, bool],
    sentence: SentenceConfig,
    inputs: Sequence,
    task: str | None = None,
    titles: Sequence[str | None] | None = None,
) -> list[list[int]]:
    """Token ids for each input: a text, or a list of token ids standing for one; `ends`: whether the tokenizer
    adds <bos> and <eos> (tokenizer.sequence_ends); `titles`: one per input (documents only), or None."""
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence) or not inputs:
        raise Gemma3Error("texts must be a non-empty list of strings (or of token-id lists)")
    if titles is not None and len(titles) != len(inputs):
        raise Gemma3Error(f"{len(titles)} titles for {len(inputs)} texts: give one title per text")
    prompt = task_prompt(sentence, task)
    out = []
    for i, item in enumerate(inputs):
        item_prompt = titled(prompt, None if titles is None else titles[i])
        if isinstance(item, str):
            body = tokenizer.encode(item_prompt + item, add_bos=False)
        else:
            body = tokenizer.encode(item_prompt, add_bos=False) if item_prompt else []
            body += token_list(item, i, tokenizer.vocab_size)
        out.append(with_ends(body, ends, sentence.max_seq_length))
    return out


def token_list(item, index: int, vocab: int) -> list[int]:
    if (
        not isinstance(item, (list, tuple))
        or not item
        or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in item)
    ):
        raise Gemma3Error(
            f"input {index} must be a string or a non-empty list of token ids below the vocabulary size {vocab}"
        )
    return list(item)


def with_ends(body: list[int], ends: tuple[bool, bool], limit: int) -> list[int]:
    """`body` cut so that it fits `limit` tokens with the <bos>/<eos> the tokenizer adds, then those added."""
    bos, eos = ends
    kept = body[: max(limit - bos - eos, 0)]
    return [BOS_ID] * bos + kept + [EOS_ID] * eos

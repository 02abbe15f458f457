"""Chat keeps its cache between turns: turn 2 equals transformers over the whole conversation; save/load continues."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch
from conftest import log_softmax

import mlx_gemma3
from mlx_gemma3.processing.prompt import prompt_ids


def reference_step_logits(reference, ids: list[int], prompt_length: int) -> np.ndarray:
    """transformers' logits at the positions that predicted each generated token."""
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0].float().numpy()
    return log_softmax(logits[prompt_length - 1 : len(ids) - 1])


def forced(reply: list[int]):
    """A logits processor that makes the model say `reply` (a random tiny model's own replies are noise)."""
    first = []

    def force(tokens, logits):
        first.append(first[0] if first else tokens.size)
        step = tokens.size - first[0]
        return mx.where(mx.arange(logits.shape[-1]) == reply[min(step, len(reply) - 1)], 1e4, logits)

    return force


def test_second_turn_equals_a_single_pass_over_the_conversation(tiny_chat_model):
    folder, _, reference = tiny_chat_model
    model, processor = mlx_gemma3.load(folder)
    chat = mlx_gemma3.Chat(model, processor, system="Answer briefly.", max_tokens=24)
    answer = processor.tokenizer.encode("Fine, thanks.", add_bos=False) + [106]
    chat.send("Hello there, how are you?", logits_processors=[forced(answer)])
    assert chat.messages[-1]["content"] == "Fine, thanks."
    second = list(chat.stream("Tell me about 안녕하세요 and 123."))
    turn_two = prompt_ids(processor, chat.conversation()[:-1])
    new_turn = processor.tokenizer.encode(
        "\n<start_of_turn>user\nTell me about 안녕하세요 and 123.<end_of_turn>\n<start_of_turn>model\n", add_bos=False
    )
    assert second[-1].prompt_tokens == len(new_turn)  # only the new turn was prefilled
    generated = [r.token for r in second]
    expected = reference_step_logits(reference, turn_two + generated, len(turn_two))
    ours = np.stack([np.array(r.logprobs) for r in second])
    assert np.abs(ours - expected).max() <= 1e-4
    assert generated == list(expected.argmax(-1))


def test_a_saved_chat_continues_identically(tiny_chat_model, tmp_path):
    folder, _, _ = tiny_chat_model
    model, processor = mlx_gemma3.load(folder)
    chat = mlx_gemma3.Chat(model, processor, max_tokens=16)
    chat.send("First question?")
    chat.save(tmp_path / "chat.safetensors")
    resumed = mlx_gemma3.Chat(model, processor, max_tokens=16)
    resumed.load(tmp_path / "chat.safetensors")
    assert resumed.messages == chat.messages
    ours, theirs = list(chat.stream("Second?")), list(resumed.stream("Second?"))
    assert [r.token for r in ours] == [r.token for r in theirs]
    assert np.array_equal(
        np.stack([np.array(r.logprobs) for r in ours]), np.stack([np.array(r.logprobs) for r in theirs])
    )
    assert theirs[-1].prompt_tokens == ours[-1].prompt_tokens


def test_a_stopped_reply_leaves_the_chat_usable(tiny_chat_model):
    folder, _, reference = tiny_chat_model
    model, processor = mlx_gemma3.load(folder)
    chat = mlx_gemma3.Chat(model, processor, max_tokens=30)
    stream = chat.stream("Tell me a long story.")
    next(stream), next(stream)
    stream.close()
    assert len(chat.messages) == 2
    second = list(chat.stream("Go on."))
    ids = prompt_ids(processor, chat.conversation()[:-1])
    generated = [r.token for r in second]
    expected = reference_step_logits(reference, ids + generated, len(ids))
    assert np.abs(np.stack([np.array(r.logprobs) for r in second]) - expected).max() <= 1e-4


def test_reset_and_system_start_over(tiny_chat_model):
    folder, _, _ = tiny_chat_model
    model, processor = mlx_gemma3.load(folder)
    chat = mlx_gemma3.Chat(model, processor, max_tokens=4)
    chat.send("Hi")
    chat.set_system("Be terse.")
    assert chat.messages == [] and chat.cache[0].offset == 0
    chat.send("Hi")
    assert chat.conversation()[0] == {"role": "system", "content": "Be terse."}


def test_repetition_penalty_sees_the_whole_conversation(tiny_chat_model):
    """The penalty of turn two covers the cached first turn too, as transformers applies it to all input ids."""
    folder, _, reference = tiny_chat_model
    model, processor = mlx_gemma3.load(folder)
    chat = mlx_gemma3.Chat(model, processor, system="Answer briefly.", max_tokens=12)
    answer = processor.tokenizer.encode("Fine, thanks.", add_bos=False) + [106]
    chat.send("Hello there, how are you?", logits_processors=[forced(answer)])
    second = list(chat.stream("Tell me more.", repetition_penalty=1.5))
    turn_two = prompt_ids(processor, chat.conversation()[:-1])
    assert second[-1].prompt_tokens < len(turn_two) // 2  # the first turn came from the cache
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([turn_two]),
            max_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.5,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=[1, 106],
            pad_token_id=0,
        )
    expected_tokens = out.sequences[0, len(turn_two) :].tolist()
    expected = log_softmax(torch.stack(out.scores, dim=1)[0].float().numpy())
    assert [r.token for r in second] == expected_tokens
    assert np.abs(np.stack([np.array(r.logprobs) for r in second]) - expected).max() <= 1e-4

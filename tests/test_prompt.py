"""Chat prompts: Gemma 3's built-in format and a folder's own template, against transformers' apply_chat_template."""

from __future__ import annotations

import pytest
from conftest import FIXTURES
from spm_fixture import reference as hf_tokenizer
from spm_fixture import train_tokenizer

from mlx_gemma3 import Gemma3Error
from mlx_gemma3.processing.processor import Processor
from mlx_gemma3.processing.prompt import gemma_chat, prompt_ids, render_template
from mlx_gemma3.processing.tokenizer import Tokenizer

TEMPLATE = (FIXTURES / "gemma3_chat_template.jinja").read_text()
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Hello  "},
        {"role": "assistant", "content": " Hey!\n"},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": " what?"}],
        }
    ],
    [
        {"role": "system", "content": [{"type": "text", "text": "Answer in Korean."}]},
        {"role": "user", "content": "안녕하세요"},
        {"role": "model", "content": "네"},
        {"role": "user", "content": "🙂 <start_of_turn> 123"},
    ],
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompt")
    train_tokenizer(folder)
    return Tokenizer(folder / "tokenizer.model"), hf_tokenizer(folder)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_builtin_format_and_template_rendering_match_transformers(tokenizers, messages):
    _, hf = tokenizers
    expected = hf.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert gemma_chat(messages) == expected
    assert render_template(TEMPLATE, messages) == expected


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_prompt_ids_equal_transformers_tokenized_chat(tokenizers, messages):
    ours, hf = tokenizers
    expected = hf.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    for template in (TEMPLATE, None):  # the folder's template, and the built-in format for folders without one
        assert prompt_ids(Processor(ours, None, template), messages) == list(expected)


def test_a_base_model_completes_plain_text(tokenizers):
    ours, hf = tokenizers
    processor = Processor(ours, None, None)
    assert prompt_ids(processor, "Once upon a time") == hf.encode("Once upon a time")
    with_template = Processor(ours, None, TEMPLATE)
    assert prompt_ids(with_template, "Once", use_chat_template=False) == hf.encode("Once")
    assert (
        prompt_ids(with_template, "Once")
        == hf.apply_chat_template(
            [{"role": "user", "content": "Once"}], chat_template=TEMPLATE, tokenize=True, add_generation_prompt=True
        )["input_ids"]
    )


BAD = [
    ([], "non-empty list"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    ([{"role": "assistant", "content": "a"}], "must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "may only come first"),
    ([{"role": "robot", "content": "a"}], "has role 'robot'"),
    ([{"role": "user"}], "must be a dict with 'role' and 'content'"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "must be {'type': 'text'"),
]


@pytest.mark.parametrize("messages,message", BAD)
def test_bad_conversations_get_one_clear_error(tokenizers, messages, message):
    processor = Processor(tokenizers[0], None, TEMPLATE)
    with pytest.raises(Gemma3Error, match=message):
        prompt_ids(processor, messages)


def test_template_errors_become_clear_errors():
    with pytest.raises(Gemma3Error, match="refused the messages: roles must alternate"):
        render_template(TEMPLATE, [{"role": "assistant", "content": "a"}])
    with pytest.raises(Gemma3Error, match="chat template failed"):
        render_template("{% if %}", [{"role": "user", "content": "a"}])


def test_system_given_twice_is_refused(tokenizers):
    processor = Processor(tokenizers[0], None, None)
    with pytest.raises(Gemma3Error, match="given twice"):
        prompt_ids(processor, [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}], system="c")

"""The public Python API's contract: clear Gemma3Errors for bad arguments, max_tokens=-1, prefill progress,
prompt cache files, base-model detection."""

from __future__ import annotations

import shutil

import pytest
from conftest import TINY_TEXT, random_ids, run_cli

import mlx_gemma3
from mlx_gemma3.processing.prompt import is_base_model
from mlx_gemma3.processing.tokenizer import single_token_ids

CONTEXT = TINY_TEXT["max_position_embeddings"]
NO_EOS = {1: -1e9, 106: -1e9}  # keeps a random tiny model from stopping early


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    folder, _, _ = tiny_chat_model
    return mlx_gemma3.load(folder)


@pytest.fixture(scope="module")
def base_folder(tiny_chat_model, tmp_path_factory):
    """The tiny chat model without its chat template: a base model by the folder rule."""
    folder = tmp_path_factory.mktemp("base") / "mlx"
    shutil.copytree(tiny_chat_model[0], folder)
    (folder / "chat_template.jinja").unlink()
    return folder


BAD_VALUES = [
    ("temp", -0.5, ["0"]),
    ("top_p", 1.5, ["(0, 1]"]),
    ("top_p", 0, ["(0, 1]"]),
    ("min_p", 2.0, ["[0, 1]"]),
    ("top_k", -3, ["0"]),
    ("max_tokens", 0, ["-1"]),
    ("prefill_step_size", 0, ["positive"]),
    ("repetition_penalty", 0, ["positive"]),
    ("kv_bits", 3, ["4", "8"]),
    ("kv_group_size", 48, ["32", "64", "128"]),
    ("max_kv_size", 0, ["positive"]),
]


@pytest.mark.parametrize("name,value,allowed", BAD_VALUES)
def test_a_bad_option_names_itself_and_its_range(tiny, name, value, allowed):
    model, processor = tiny
    with pytest.raises(mlx_gemma3.Gemma3Error) as error:
        mlx_gemma3.generate(model, processor, "Hi", **{name: value})
    message = str(error.value)
    assert message.startswith(name) and str(value) in message and all(a in message for a in allowed), message
    others = {"temp", "top_p", "top_k", "min_p"} - {name}
    assert not any(other in message for other in others), message  # one option, not every limit


BAD_TYPES = [
    dict(temp="hot"),
    dict(max_tokens=2.5),
    dict(top_k=1.5),
    dict(seed="x"),
    dict(logit_bias=[1]),
    dict(logit_bias={"a": 1.0}),
    dict(logits_processors=[1]),
    dict(stop_ids="<eos>"),
    dict(system=3),
    dict(use_chat_template="no"),
    dict(prefill_progress=5),
    dict(prompt_cache_file=3),
    dict(max_tokens=True),
]


@pytest.mark.parametrize("options", BAD_TYPES, ids=lambda o: next(iter(o)))
def test_a_badly_typed_option_is_a_gemma3_error(tiny, options):
    model, processor = tiny
    (name,) = options
    with pytest.raises(mlx_gemma3.Gemma3Error, match=f"^{name} must be"):
        mlx_gemma3.generate(model, processor, "Hi", **options)
    with pytest.raises(mlx_gemma3.Gemma3Error, match=f"^{name} must be"):
        mlx_gemma3.Chat(model, processor, **options)


def test_an_unknown_option_lists_the_valid_ones(tiny):
    model, processor = tiny
    for call in (
        lambda: mlx_gemma3.generate(model, processor, "Hi", max_token=5),
        lambda: next(mlx_gemma3.stream_generate(model, processor, "Hi", max_token=5)),
        lambda: mlx_gemma3.Chat(model, processor, max_token=5),
        lambda: mlx_gemma3.Chat(model, processor).send("Hi", max_token=5),
    ):
        with pytest.raises(mlx_gemma3.Gemma3Error) as error:
            call()
        message = str(error.value)
        assert "'max_token'" in message and "did you mean 'max_tokens'" in message
        assert "temp" in message and "top_p" in message and "stop_ids" in message


@pytest.mark.parametrize("prompt", [5, None, 2.5, {"role": "user"}])
def test_a_prompt_of_the_wrong_type(tiny, prompt):
    model, processor = tiny
    with pytest.raises(
        mlx_gemma3.Gemma3Error, match="a prompt is a string, a list of chat messages or a list of token ids"
    ):
        mlx_gemma3.generate(model, processor, prompt)


def test_model_and_processor_must_come_from_load(tiny):
    model, processor = tiny
    for call in (
        lambda: mlx_gemma3.generate(model, "processor", "Hi"),
        lambda: mlx_gemma3.generate(None, None, "Hi"),
        lambda: next(mlx_gemma3.stream_generate("model-folder", processor, "Hi")),
        lambda: mlx_gemma3.Chat(model, None),
    ):
        with pytest.raises(mlx_gemma3.Gemma3Error, match=r"mlx_gemma3.load\(\)"):
            call()


@pytest.mark.parametrize("unlimited", [-1, None])
def test_max_tokens_unlimited_runs_to_the_end_of_the_context(tiny, unlimited):
    model, processor = tiny
    prompt = random_ids(CONTEXT - 20, seed=3)[0].tolist()
    responses = list(mlx_gemma3.stream_generate(model, processor, prompt, max_tokens=unlimited, logit_bias=NO_EOS))
    assert len(responses) == 20 and responses[-1].finish_reason == "length"


def test_max_tokens_unlimited_stops_at_the_end_of_the_reply(tiny):
    model, processor = tiny
    bias = {1: 1e9}  # <eos> at once
    responses = list(mlx_gemma3.stream_generate(model, processor, "Hi", max_tokens=-1, logit_bias=bias))
    assert len(responses) == 1 and responses[0].finish_reason == "stop"


def test_prefill_progress_reports_each_chunk(tiny):
    model, processor = tiny
    prompt = random_ids(100, seed=4)[0].tolist()
    calls = []
    mlx_gemma3.generate(
        model,
        processor,
        prompt,
        max_tokens=1,
        prefill_step_size=32,
        prefill_progress=lambda done, total: calls.append((done, total)),
    )
    # the whole prompt, as the statistics and mlx-lm's prompt_progress_callback count it (the first step feeds the
    # last token, so the last chunk ends at 99 and prefill's end is reported as 100 of 100)
    assert calls == [(32, 100), (64, 100), (96, 100), (100, 100)]


def test_generate_step_progress(tiny):
    model, _ = tiny
    calls = []
    steps = mlx_gemma3.generate_step(
        model,
        list(range(3, 53)),
        model.make_cache(),
        prefill_step_size=20,
        max_tokens=1,
        progress=lambda done, total: calls.append((done, total)),
    )
    list(steps)
    assert calls == [(20, 50), (40, 50), (50, 50)]


def test_prompt_cache_file_reuses_a_matching_prefix(tiny, tmp_path):
    model, processor = tiny
    path = tmp_path / "prompt.safetensors"
    document = random_ids(60, seed=5)[0].tolist()
    question = random_ids(8, seed=6)[0].tolist()
    first = list(mlx_gemma3.stream_generate(model, processor, document, max_tokens=4, prompt_cache_file=path))
    assert first[-1].reused_tokens == 0 and path.is_file()
    second = list(
        mlx_gemma3.stream_generate(model, processor, document + question, max_tokens=6, prompt_cache_file=path)
    )
    assert second[-1].reused_tokens == len(document) - 1 and second[-1].prompt_tokens == len(question) + 1
    fresh = list(mlx_gemma3.stream_generate(model, processor, document + question, max_tokens=6))
    assert [r.token for r in second] == [r.token for r in fresh]
    other = list(
        mlx_gemma3.stream_generate(model, processor, question + document, max_tokens=2, prompt_cache_file=path)
    )
    assert other[-1].reused_tokens == 0  # not a prefix: prefilled afresh, and the file now holds this prompt
    again = list(
        mlx_gemma3.stream_generate(model, processor, question + document, max_tokens=2, prompt_cache_file=path)
    )
    assert again[-1].reused_tokens == len(question + document) - 1


def test_prompt_cache_file_refuses_a_cache_and_images(tiny, tmp_path):
    model, processor = tiny
    with pytest.raises(mlx_gemma3.Gemma3Error, match="prompt_cache_file"):
        mlx_gemma3.generate(model, processor, "Hi", cache=model.make_cache(), prompt_cache_file=tmp_path / "c")
    with pytest.raises(mlx_gemma3.Gemma3Error, match="chat.save"):
        mlx_gemma3.Chat(model, processor, prompt_cache_file=tmp_path / "c")


def test_extra_stop_tokens_must_be_single_tokens(tiny):
    _, processor = tiny
    assert single_token_ids(processor.tokenizer, ["<end_of_turn>"]) == [106]
    with pytest.raises(mlx_gemma3.Gemma3Error, match="not one"):
        single_token_ids(processor.tokenizer, ["a long phrase of several words"])


def test_base_model_rule_and_its_system_prompt(tiny, base_folder):
    model, processor = mlx_gemma3.load(base_folder)
    assert is_base_model(processor) and not is_base_model(tiny[1])
    # a system prompt makes a conversation, in Gemma 3's chat format (the same weights with the template agree)
    on_base = mlx_gemma3.generate(model, processor, "Hi", system="Be brief.", max_tokens=4)
    assert on_base == mlx_gemma3.generate(*tiny, "Hi", system="Be brief.", max_tokens=4)
    with pytest.raises(mlx_gemma3.Gemma3Error, match="use_chat_template=False"):
        mlx_gemma3.generate(model, processor, "Hi", system="Be brief.", use_chat_template=False)


def test_generate_stays_the_function_after_the_command_line_module_is_imported():
    """`import mlx_gemma3.generate` (the command line) used to rebind the package's `generate` to that module."""
    code = (
        "import mlx_gemma3.generate, mlx_gemma3\n"
        "from mlx_gemma3 import generate\n"
        "import sys\n"
        "print(mlx_gemma3.generate is generate, generate.__module__, sys.modules['mlx_gemma3.generate'].main.__name__)"
    )
    result = run_cli("-c", code, module=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "mlx_gemma3.generation.text_stream", "main"]

"""FunctionGemma and TranslateGemma: prompts rendered from the folder's own template equal transformers'
apply_chat_template of the same messages (tools, calls, results, language codes, chat_template_kwargs); FunctionGemma's
calls parsed back, held to their schemas by a grammar and stopped at <start_function_response>, through the library,
the command lines and a real server process asked by the openai client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import llguidance
import pytest
from conftest import FIXTURES, convert, run_cli, tiny_text_model

import mlx_gemma3
from mlx_gemma3.errors import Gemma3Error
from mlx_gemma3.processing.function_gemma import FUNCTION_GEMMA, RESPONSE_START
from mlx_gemma3.processing.prompt import chat_text, prompt_ids
from mlx_gemma3.processing.tools import ToolCall, parse_tool_calls, tool_call_grammar

MARKERS = (
    "<start_function_declaration>",
    "<end_function_declaration>",
    "<start_function_call>",
    "<end_function_call>",
    "<start_function_response>",
    "<end_function_response>",
    "<escape>",
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city name, e.g. San Francisco"},
                "unit": {"type": "string", "description": "Degrees", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "description": "How many days ahead"},
            },
            "required": ["city", "days"],
        },
    },
}
ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "description": "Sets alarms.",
        "parameters": {
            "type": "object",
            "properties": {
                "times": {"type": "array", "description": "Times", "items": {"type": "string"}},
                "loud": {"type": "boolean", "description": "Ring loudly"},
                "place": {
                    "type": "object",
                    "description": "Where",
                    "properties": {"room": {"type": "string", "description": "Room"}},
                    "required": ["room"],
                },
            },
            "required": ["times"],
        },
    },
}
DEVELOPER = {
    "role": "developer",
    "content": "You are a model that can do function calling with the following functions",
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris, France", "days": 2}}}
CONVERSATIONS = {
    "declarations": [DEVELOPER, {"role": "user", "content": "What is the weather in Paris?"}],
    "system and no tools": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "a call and its result": [
        DEVELOPER,
        {"role": "user", "content": "Weather in Paris in two days?"},
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "name": "get_weather", "content": {"temperature": 15, "weather": "sunny"}},
        {"role": "assistant", "content": "It will be sunny, 15 degrees."},
        {"role": "user", "content": "And wake me at 7 and 8 in the kitchen."},
    ],
    "parallel calls": [
        {"role": "user", "content": "Weather in Paris, and an alarm"},
        {
            "role": "assistant",
            "tool_calls": [
                CALL,
                {
                    "type": "function",
                    "function": {
                        "name": "set_alarm",
                        "arguments": {"times": ["7:00", "8:00"], "loud": True, "place": {"room": "kitchen"}},
                    },
                },
            ],
        },
        {"role": "tool", "name": "get_weather", "content": "sunny"},
        {"role": "tool", "name": "set_alarm", "content": {"ok": True, "count": 2}},
    ],
}
LANGUAGE_TURNS = [
    {"role": "user", "content": [{"type": "text", "source_lang_code": "cs", "target_lang_code": "de-DE", "text": " Ahoj světe "}]},
    {"role": "assistant", "content": "Hallo Welt"},
    {"role": "user", "content": [{"type": "text", "source_lang_code": "en_US", "target_lang_code": "ja", "text": "Good night"}]},
]  # fmt: skip


def variant_folder(folder: Path, template: str) -> tuple[Path, object]:
    """A converted tiny model whose SentencePiece holds FunctionGemma's markers and whose folder ships `template`:
    (mlx folder, transformers' tokenizer of the same files)."""
    from spm_fixture import reference, train_tokenizer

    tiny_text_model(seed=5).save_pretrained(folder / "hf")
    train_tokenizer(folder / "hf", extra_symbols=MARKERS)
    reference(folder / "hf")
    shutil.copyfile(FIXTURES / template, folder / "hf" / "chat_template.jinja")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "hf")
    return convert(folder / "hf", folder / "mlx"), tokenizer


@pytest.fixture(scope="module")
def function_gemma(tmp_path_factory):
    return variant_folder(tmp_path_factory.mktemp("functiongemma"), "functiongemma_chat_template.jinja")


@pytest.fixture(scope="module")
def translate_gemma(tmp_path_factory):
    return variant_folder(tmp_path_factory.mktemp("translategemma"), "translategemma_chat_template.jinja")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_function_gemma_prompts_equal_transformers(function_gemma, name):
    folder, tokenizer = function_gemma
    messages, tools = CONVERSATIONS[name], [WEATHER, ALARM] if name != "system and no tools" else None
    _, processor = mlx_gemma3.load(folder)
    assert processor.tool_style == FUNCTION_GEMMA
    ends_on_result = messages[-1]["role"] == "tool"
    expected = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert chat_text(messages, processor.chat_template, tools=tools) == expected
    expected_ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)["input_ids"]
    assert prompt_ids(processor, messages, tools=tools) == expected_ids
    if name == "declarations":  # the shape of Google's documented declaration, property by property
        assert (
            "<start_function_declaration>declaration:get_weather{description:<escape>Gets the weather for a city."
            "<escape>,parameters:{properties:{city:{description:<escape>The city name, e.g. San Francisco<escape>,"
            "type:<escape>STRING<escape>},days:{description:<escape>How many days ahead<escape>,type:<escape>INTEGER"
            "<escape>},unit:{description:<escape>Degrees<escape>,enum:[<escape>celsius<escape>,<escape>fahrenheit"
            "<escape>],type:<escape>STRING<escape>}},required:[<escape>city<escape>,<escape>days<escape>],"
            "type:<escape>OBJECT<escape>}}<end_function_declaration>"
        ) in expected
    assert expected.endswith("<end_function_response>" if ends_on_result else "<start_of_turn>model\n")


FUNCTION_CALLS = [
    (
        "<start_function_call>call:get_weather{city:<escape>Paris, France {the} [capital]<escape>,days:2}"
        "<end_function_call>",
        [ToolCall("get_weather", {"city": "Paris, France {the} [capital]", "days": 2})],
    ),
    (
        "<start_function_call>call:set_alarm{loud:true,place:{room:<escape>kitchen<escape>},times:[<escape>7:00"
        "<escape>,<escape>8:00<escape>],volume:-1.5e2,label:null,note:soon}<end_function_call>"
        "<start_function_call>call:get_weather{city:<escape><escape>,days:0}<end_function_call>",
        [
            ToolCall(
                "set_alarm",
                {
                    "loud": True,
                    "place": {"room": "kitchen"},
                    "times": ["7:00", "8:00"],
                    "volume": -150.0,
                    "label": None,
                    "note": "soon",
                },
            ),
            ToolCall("get_weather", {"city": "", "days": 0}),
        ],
    ),
    ("<start_function_call>call:ping{}", [ToolCall("ping", {})]),  # cut at the end marker (a stop)
    ("Sure! It is sunny.", []),
    ("<start_function_call>call:get_weather{city:<escape>Paris}<end_function_call>", []),  # an escape left open
    ("<start_function_call>get_weather{}<end_function_call>", []),  # no call: prefix
    ("<start_function_call>call:f{a:1,,b:2}<end_function_call>", []),
    ("<start_function_call>call:f{a:1}trailing<end_function_call>", []),
]


@pytest.mark.parametrize("text, calls", FUNCTION_CALLS)
def test_function_gemma_calls_parse(text, calls):
    assert parse_tool_calls(text) == calls


def matcher(processor, grammar: str):
    return llguidance.LLMatcher(processor.grammar_tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar))


def accepts(processor, grammar: str, text: str) -> bool:
    """Whether the grammar lets the model write `text` (encoded as the model would: markers as their tokens)."""
    m = matcher(processor, grammar)
    ids = processor.tokenizer.encode(text, add_bos=False)
    return all(m.consume_token(i) for i in ids) and m.is_accepting()


@pytest.mark.slow
def test_function_gemma_grammar_holds_calls_to_their_schemas(function_gemma):
    _, processor = mlx_gemma3.load(function_gemma[0])
    required = tool_call_grammar([WEATHER, ALARM], FUNCTION_GEMMA, "required")
    auto = tool_call_grammar([WEATHER, ALARM], FUNCTION_GEMMA, "auto")
    good = [
        "<start_function_call>call:get_weather{city:<escape>Paris, {France}<escape>,days:2}<end_function_call>",
        "<start_function_call>call:get_weather{city:<escape>Oslo<escape>,unit:<escape>celsius<escape>,days:-1}"
        "<end_function_call><start_function_call>call:set_alarm{times:[<escape>7:00<escape>],place:{room:<escape>"
        "hall<escape>}}<end_function_call><start_function_response>",
    ]
    bad = [
        "<start_function_call>call:get_weather{days:2}<end_function_call>",  # city is required
        "<start_function_call>call:get_weather{city:<escape>Oslo<escape>,days:2.5}<end_function_call>",  # an integer
        "<start_function_call>call:get_weather{city:<escape>Oslo<escape>,unit:<escape>kelvin<escape>,days:1}"
        "<end_function_call>",
        "<start_function_call>call:open_door{}<end_function_call>",  # no such tool
        "It is sunny.",
    ]
    for text in good:
        assert accepts(processor, required, text) and accepts(processor, auto, text), text
        assert parse_tool_calls(text)
    for text in bad[:-1]:
        assert not accepts(processor, required, text) and not accepts(processor, auto, text), text
    assert not accepts(processor, required, bad[-1]) and accepts(processor, auto, bad[-1])
    for text in good:
        for call in parse_tool_calls(text):
            schema = next(t["function"]["parameters"] for t in (WEATHER, ALARM) if t["function"]["name"] == call.name)
            jsonschema.validate(call.arguments, schema)


@pytest.mark.slow
def test_function_gemma_stops_at_the_response_marker(function_gemma):
    model, processor = mlx_gemma3.load(function_gemma[0])
    stop = processor.tokenizer.token_id(RESPONSE_START)
    assert processor.stop_ids == (stop,)
    from mlx_gemma3.generation.text_stream import eos_ids

    assert stop in eos_ids(processor)
    messages = CONVERSATIONS["declarations"]
    steps = list(
        mlx_gemma3.stream_generate(
            model,
            processor,
            messages,
            tools=[WEATHER],
            max_tokens=60,
            grammar=tool_call_grammar([WEATHER], FUNCTION_GEMMA),
            logit_bias=closing_bias(processor),
        )
    )
    text = "".join(s.text for s in steps)
    calls = parse_tool_calls(text)
    assert steps[-1].finish_reason == "stop" and len(calls) >= 1 and RESPONSE_START not in text
    for call in calls:
        assert call.name == "get_weather"
        jsonschema.validate(call.arguments, WEATHER["function"]["parameters"])


@pytest.mark.slow
def test_translate_gemma_prompts_equal_transformers(translate_gemma):
    folder, tokenizer = translate_gemma
    _, processor = mlx_gemma3.load(folder)
    expected = tokenizer.apply_chat_template(LANGUAGE_TURNS, tokenize=False, add_generation_prompt=True)
    assert "You are a professional Czech (cs) to German (de-DE) translator." in expected
    assert "Please translate the following English text into Japanese:\n\n\nGood night<end_of_turn>" in expected
    assert chat_text(LANGUAGE_TURNS, processor.chat_template) == expected
    assert (
        prompt_ids(processor, LANGUAGE_TURNS)
        == tokenizer.apply_chat_template(LANGUAGE_TURNS, add_generation_prompt=True)["input_ids"]
    )
    # chat_template_kwargs: plain turns take the pair; an item's own codes win; every kwarg reaches the template
    codes = {"source_lang_code": "en", "target_lang_code": "fr"}
    plain = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Bonjour"}, LANGUAGE_TURNS[2]]
    explicit = [{"role": "user", "content": [{"type": "text", "text": "Hello", **codes}]}, *plain[1:]]
    reference = tokenizer.apply_chat_template(explicit, tokenize=False, add_generation_prompt=True, **codes)
    assert chat_text(plain, processor.chat_template, template_kwargs=codes) == reference
    assert (
        prompt_ids(processor, "Hello", template_kwargs=codes)
        == tokenizer.apply_chat_template(explicit[:1], add_generation_prompt=True, **codes)["input_ids"]
    )


@pytest.mark.slow
def test_template_arguments_errors(translate_gemma, function_gemma):
    _, processor = mlx_gemma3.load(translate_gemma[0])
    for kwargs, message in (
        ({"messages": []}, "is set by the prompt itself"),
        ({"1x": 2}, "keys are names"),
        ({}, "User role must provide `content` as an iterable with exactly one item"),
    ):
        with pytest.raises(Gemma3Error, match=message):
            prompt_ids(processor, "Hello", template_kwargs=kwargs)
    _, processor = mlx_gemma3.load(function_gemma[0])
    with pytest.raises(Gemma3Error, match="A tool response must follow a tool call"):
        prompt_ids(processor, [{"role": "user", "content": "x"}, {"role": "tool", "name": "f", "content": "1"}])
    with pytest.raises(Gemma3Error, match="role"):
        prompt_ids(processor, [{"role": "robot", "content": "x"}])


@pytest.mark.slow
def test_command_lines_take_chat_template_args(translate_gemma):
    folder, tokenizer = translate_gemma
    codes = {"source_lang_code": "en", "target_lang_code": "fr"}
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hello", **codes}]}], add_generation_prompt=True
    )["input_ids"]
    for flag in ("--chat-template-args", "--chat-template-config"):  # mlx_lm.server's name, mlx_lm.generate's
        result = run_cli(
            "mlx_gemma3.generate", "--model", str(folder), "-p", "Hello", "--max-tokens", "2", flag, json.dumps(codes)
        )
        assert result.returncode == 0, result.stderr
        assert f"Prompt: {len(expected)} tokens" in result.stderr
    result = run_cli("mlx_gemma3.generate", "--model", str(folder), "-p", "Hi", "--chat-template-args", "[1]")
    assert result.returncode == 2 and result.stderr.startswith("error: argument --chat-template-args")
    result = run_cli("mlx_gemma3.chat", "--model", str(folder), "--chat-template-args", "{", stdin="")
    assert result.returncode == 2 and "not valid JSON" in result.stderr
    result = run_cli("mlx_gemma3.generate", "--model", str(folder), "-p", "Hi", "--max-tokens", "1")
    assert result.returncode == 1 and "exactly one item" in result.stderr and "Traceback" not in result.stderr


def served(folder: Path, *flags: str):
    command = [sys.executable, "-m", "mlx_gemma3.server", "--model", str(folder), "--port", "0", "--no-web", *flags]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = process.stderr.readline()
    assert line.startswith("serving"), line + process.stderr.read()
    return process, int(line.rsplit(":", 1)[1].split("/")[0])


def stop(process) -> None:
    process.terminate()
    process.communicate(timeout=30)


def closing_bias(processor) -> dict[int, float]:
    """The random model would write strings and numbers without end: a bias on what closes them ends them."""
    closing = [processor.tokenizer.token_id(m) for m in ("<escape>", "<end_function_call>", RESPONSE_START)]
    return {i: 1e3 for i in closing + processor.tokenizer.encode("}", False)}


@pytest.mark.slow
def test_server_function_gemma_tool_calls(function_gemma):
    """The server (in this process, to add the closing bias) through the openai client: FunctionGemma's template
    renders the OpenAI tools, calls and results as transformers does; the forced calls come back as tool_calls."""
    import threading

    import openai

    from mlx_gemma3.serve.http import ServerState, make_server

    folder, tokenizer = function_gemma
    model, processor = mlx_gemma3.load(folder)
    state = ServerState(model, processor, "tiny", extra_options={"logit_bias": closing_bias(processor)})
    httpd = make_server(state, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        openai_messages = [
            DEVELOPER,
            {"role": "user", "content": "Weather in Paris in two days?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(CALL["function"]["arguments"])}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 15, "weather": "sunny"})},
            {"role": "assistant", "content": "It will be sunny, 15 degrees."},
            {"role": "user", "content": "And wake me at 7 and 8 in the kitchen."},
        ]  # fmt: skip
        for choice in ("required", {"type": "function", "function": {"name": "set_alarm"}}):
            reply = client.chat.completions.create(
                model="tiny", messages=openai_messages, tools=[WEATHER, ALARM], tool_choice=choice, max_tokens=60
            )
            expected = tokenizer.apply_chat_template(
                CONVERSATIONS["a call and its result"], tools=[WEATHER, ALARM], add_generation_prompt=True
            )["input_ids"]
            assert reply.usage.prompt_tokens == len(expected)
            message = reply.choices[0].message
            assert reply.choices[0].finish_reason == "tool_calls" and message.tool_calls
            for call in message.tool_calls:
                tool = next(t for t in (WEATHER, ALARM) if t["function"]["name"] == call.function.name)
                jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
                if isinstance(choice, dict):
                    assert call.function.name == "set_alarm"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.slow
def test_server_translate_gemma_template_kwargs(translate_gemma):
    import openai

    folder, tokenizer = translate_gemma
    codes = {"source_lang_code": "en", "target_lang_code": "fr"}
    process, port = served(folder, "--chat-template-args", json.dumps({"source_lang_code": "de"}))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        expected = tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "Hello", **codes}]}], add_generation_prompt=True
        )["input_ids"]
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=1,
            extra_body={"chat_template_kwargs": {"target_lang_code": "fr", "source_lang_code": "en"}},
        )
        assert reply.usage.prompt_tokens == len(expected)
        items = [{"type": "text", "text": "Hello", "source_lang_code": "cs", "target_lang_code": "ja"}]
        expected = tokenizer.apply_chat_template([{"role": "user", "content": items}], add_generation_prompt=True)
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": items}], max_tokens=1
        )
        assert reply.usage.prompt_tokens == len(expected["input_ids"])
        with pytest.raises(openai.BadRequestError, match="chat template failed"):  # the default names no target
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], extra_body={"chat_template_kwargs": [1]}
            )
    finally:
        stop(process)

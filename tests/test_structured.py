"""Structured output (issue 19): JSON schemas, regular expressions, Lark grammars and tool calls that every reply
satisfies, through the API, Chat, speculative decoding, the CLI and the server; the real 270M on 20 schemas."""

from __future__ import annotations

import json
import re
import threading
import typing
from pathlib import Path

import jsonschema
import mlx.core as mx
import openai
import pytest
from conftest import run_cli

import mlx_gemma3
from mlx_gemma3 import Chat, Gemma3Error, generate, stream_generate
from mlx_gemma3.generation.constrain import DEAD_END, Constraint
from mlx_gemma3.generation.speculative import admissible_drafts
from mlx_gemma3.generation.step import generate_step
from mlx_gemma3.processing.grammar import grammar_text
from mlx_gemma3.processing.tools import parse_tool_calls, run_tools, tool_call_grammar
from mlx_gemma3.serve.http import ServerState, make_server

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


class OpensWith:
    """A logits processor that makes `token` the reply's first token and leaves later steps alone."""

    def __init__(self, token: int):
        self.token, self.start = token, None

    def __call__(self, tokens, logits):
        self.start = tokens.size if self.start is None else self.start
        boost = 1e4 if tokens.size == self.start else 0.0
        return mx.where(mx.arange(logits.shape[-1]) == self.token, logits + boost, logits)


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    return mlx_gemma3.load(tiny_chat_model[0])


def reply_json(model, processor, schema, **options):
    text = generate(model, processor, "Give me JSON.", json_schema=schema, max_tokens=80, **options)
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def test_vocabulary_view_spells_what_transformers_decodes(tiny, tiny_chat_model):
    """llguidance's bytes for our ids, joined, are the text transformers' tokenizer decodes from the same ids."""
    from spm_fixture import reference
    from transformers import AutoTokenizer

    _, processor = tiny
    reference(tiny_chat_model[1])
    ref = AutoTokenizer.from_pretrained(tiny_chat_model[1])
    ll = processor.grammar_tokenizer
    for text in ["The quick brown fox.", "안녕하세요 😀 mixed\n\n  spaces", '{"a": [1, 2.5, "x\\"y"]}']:
        ids = ref(text, add_special_tokens=False)["input_ids"]
        assert ll.decode_bytes(ids).decode() == ref.decode(ids)
    assert ll.is_special_token(106) and ll.is_special_token(1) and sorted(ll.eos_tokens) == [1, 106]


@pytest.mark.slow
def test_random_model_replies_valid_json_greedy_and_sampled(tiny):
    """A random tiny model cannot write JSON by chance: with the schema it always does."""
    model, processor = tiny
    assert reply_json(model, processor, PERSON)
    for seed in range(3):
        assert reply_json(model, processor, PERSON, temp=1.0, seed=seed)
    free = generate(model, processor, "Give me JSON.", max_tokens=40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)


def test_regex_and_lark_grammar(tiny):
    model, processor = tiny
    date = generate(model, processor, "When?", regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", max_tokens=30)
    assert re.fullmatch(r"20\d\d-(0[1-9]|1[0-2])-[0-3]\d", date)
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]{0,2}/\n'
    assert re.fullmatch(r"The answer is [1-9]\d{0,2}\.", generate(model, processor, "Q", grammar=lark, max_tokens=30))


def test_finished_grammar_ends_the_reply(tiny):
    model, processor = tiny
    out = list(stream_generate(model, processor, "Pick", regex="(yes|no)", max_tokens=50))
    assert "".join(o.text for o in out) in ("yes", "no") and out[-1].finish_reason == "stop"


def test_pydantic_model_and_chat_turns(tiny):
    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        x: int = pydantic.Field(ge=-99, le=99)  # bounded: a random model would otherwise write digits until max_tokens
        y: int = pydantic.Field(ge=-99, le=99)

    model, processor = tiny
    chat = Chat(model, processor, json_schema=Point)
    for turn in ("A point?", "Another?"):
        Point.model_validate_json(chat.send(turn, max_tokens=40))


@pytest.mark.slow
def test_speculative_decoding_keeps_the_constraint_and_the_text(tiny, tiny_chat_model):
    """Drafts the grammar refuses are rejected; the constrained reply is the same as without speculation."""
    model, processor = tiny
    plain = generate(model, processor, "Give me JSON.", json_schema=PERSON, max_tokens=60)
    lookup = generate(model, processor, "Give me JSON.", json_schema=PERSON, max_tokens=60, prompt_lookup=3)
    drafted = generate(model, processor, "Give me JSON.", json_schema=PERSON, max_tokens=60, draft_model=model)
    assert plain == lookup == drafted
    jsonschema.validate(json.loads(plain), PERSON)
    sampled = generate(
        model, processor, "Give me JSON.", json_schema=PERSON, max_tokens=60, draft_model=model, temp=1.0, seed=3
    )
    jsonschema.validate(json.loads(sampled), PERSON)


def test_drafts_are_cut_at_the_first_token_the_grammar_refuses(tiny):
    _, processor = tiny
    encode = lambda text: processor.tokenizer.encode(text, add_bos=False)  # noqa: E731
    constraint = Constraint(processor, grammar_text(regex="a+b+"))
    prompt = processor.tokenizer.encode("x")
    a, b, z = encode("a")[0], encode("b")[0], encode("z")[0]
    drafts, probs = admissible_drafts((constraint,), prompt, [a, a, b, z, b], mx.ones((5, 4)))
    assert drafts == [a, a, b] and probs.shape == (3, 4)
    assert admissible_drafts((constraint,), [*prompt, a], [z, a], None) == ([], None)
    assert admissible_drafts((), prompt, [z], None) == ([z], None)


def test_bad_constraints_are_clear_errors(tiny):
    model, processor = tiny
    cases = [
        (dict(json_schema={"type": "object", "if": {}, "then": {}}), r'Unimplemented keys: \["if", "then"\]'),
        (dict(json_schema={"type": "strng"}), "json_schema cannot be used.*Invalid type"),
        (dict(regex="(unclosed"), "regex cannot be used"),
        (dict(grammar="start: missing_rule"), "grammar cannot be used"),
        (dict(regex="a", grammar='start: "a"'), "one constraint at a time"),
        (dict(json_schema=3), "json_schema must be"),
    ]
    for options, message in cases:
        with pytest.raises(Gemma3Error, match=message):
            generate(model, processor, "x", max_tokens=2, **options)


def test_dead_end_allows_only_the_end_and_names_the_token(tiny):
    """A token the grammar refuses (forced here by a processor after the constraint) is a dead end: the next step
    may only end the reply, and the reason names the token."""
    model, processor = tiny
    constraint = Constraint(processor, grammar_text(regex="a+"))
    z = processor.tokenizer.encode("z", add_bos=False)[0]
    force_z_first = lambda tokens, logits: mx.where(mx.arange(logits.shape[-1]) == z, 1e9, logits)  # noqa: E731
    steps = generate_step(
        model,
        processor.tokenizer.encode("x"),
        model.make_cache(),
        logits_processors=[constraint, force_z_first],
        max_tokens=1,
    )
    assert [t for t, _ in steps] == [z]
    logits = constraint(mx.array([*processor.tokenizer.encode("x"), z]), mx.zeros((1, model.config.text.vocab_size)))
    assert [i for i, v in enumerate(logits[0].tolist()) if v == 0] == [1, 106]
    assert constraint.dead_end == f"token {z} does not continue the grammar" and DEAD_END == "dead_end"


@pytest.mark.slow
@pytest.mark.parametrize("style", ["python", "json"])
def test_required_tool_calls_parse_and_validate(tiny, style):
    model, processor = tiny
    grammar = tool_call_grammar([WEATHER], style, "required")
    for seed in range(3):
        calls = parse_tool_calls(
            generate(model, processor, "Weather?", grammar=grammar, max_tokens=90, temp=1.0, seed=seed)
        )
        assert calls and {c.name for c in calls} == {"get_weather"}
        for call in calls:
            jsonschema.validate(call.arguments, WEATHER["function"]["parameters"])


def test_auto_tool_choice_lets_prose_through_and_holds_a_call(tiny):
    model, processor = tiny
    grammar = tool_call_grammar([WEATHER], "python", "auto")
    bracket = processor.tokenizer.encode("[", add_bos=False)[0]
    prose = generate(model, processor, "Hi", grammar=grammar, max_tokens=8, logit_bias={bracket: -1e9})
    assert prose.strip() and not prose.startswith("[") and parse_tool_calls(prose) == []
    call = generate(model, processor, "Hi", grammar=grammar, max_tokens=90, logits_processors=[OpensWith(bracket)])
    (parsed,) = parse_tool_calls(call)
    jsonschema.validate(parsed.arguments, WEATHER["function"]["parameters"])


@pytest.mark.slow
def test_run_tools_constrained_calls_with_valid_arguments(tiny):
    model, processor = tiny
    seen = []

    def get_weather(city: typing.Literal["Oslo", "Paris"], days: typing.Literal[1, 2, 3]) -> str:
        """Weather.

        Args:
            city: the city
            days: how many days
        """
        seen.append((city, days))
        return "sunny"

    bracket = processor.tokenizer.encode("[", add_bos=False)[0]
    run = run_tools(
        Chat(model, processor),
        "Weather?",
        [get_weather],
        constrained=True,
        max_rounds=1,
        max_tokens=60,
        logits_processors=[OpensWith(bracket)],
    )
    assert run.rounds and seen and all(c in ("Oslo", "Paris") and d in (1, 2, 3) for c, d in seen)


@pytest.mark.slow
def test_generate_cli_flags(tiny_chat_model, tmp_path):
    folder = str(tiny_chat_model[0])
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(PERSON))
    done = run_cli(
        "mlx_gemma3.generate",
        "--model",
        folder,
        "-p",
        "JSON",
        "--json-schema",
        str(schema),
        "--max-tokens",
        "80",
        "--verbose",
        "false",
    )
    assert done.returncode == 0, done.stderr
    jsonschema.validate(json.loads(done.stdout), PERSON)
    done = run_cli("mlx_gemma3.generate", "--model", folder, "-p", "x", "--regex", "(up|down)", "--verbose", "false")
    assert done.stdout.strip() in ("up", "down")
    (tmp_path / "bad.json").write_text('{"type": "object", "if": {}}')
    for flags, message in [
        (["--json-schema", str(tmp_path / "missing.json")], "--json-schema: cannot read"),
        (["--json-schema", str(tmp_path / "bad.json")], "Unimplemented keys"),
        (["--regex", "a", "--grammar", str(schema)], "not allowed with argument"),
    ]:
        done = run_cli("mlx_gemma3.generate", "--model", folder, "-p", "x", *flags)
        assert done.returncode != 0 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, (
            done.stderr
        )


@pytest.fixture(scope="module")
def server(tiny):
    model, processor = tiny
    httpd = make_server(
        ServerState(model, processor, "tiny", max_tokens_limit=600, max_body_bytes=100_000), "127.0.0.1", 0
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield openai.OpenAI(
        base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="x", max_retries=0, timeout=120
    )
    httpd.shutdown()
    httpd.server_close()


def test_server_response_format_json_schema_and_json_object(server):
    messages = [{"role": "user", "content": "A person?"}]
    reply = server.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    chunks = server.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=80,
        stream=True,
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=1,
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)


LABELS = {
    "type": "object",
    "properties": {
        "label": {"enum": ["red", "green", "blue"]},
        "scores": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 2,
            "maxItems": 4,
        },
    },
    "required": ["label", "scores"],
    "additionalProperties": False,
}


def test_concurrent_requests_in_one_batch_each_keep_their_own_schema(server):
    """Requests decoded together: each row's matcher follows its own schema (a shared one would break both)."""
    schemas = [PERSON, LABELS, PERSON, LABELS]
    replies: list = [None] * len(schemas)
    start = threading.Barrier(len(schemas))

    def ask(i: int) -> None:
        start.wait()
        replies[i] = server.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"Item {i}?"}],
            max_tokens=80,
            temperature=1.0,
            seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i]}},
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(schemas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for reply, schema in zip(replies, schemas):
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_server_streams_forced_tool_calls(server, choice):
    chunks = list(
        server.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=[WEATHER],
            tool_choice=choice,
            stream=True,
            max_tokens=90,
        )
    )
    calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
    assert calls and all(c.function.name == "get_weather" and c.id.startswith("call_") for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


REAL_CASES = json.loads((Path(__file__).parent / "data" / "structured_270m.json").read_text())


@pytest.fixture(scope="session")
def gemma_270m(demo_folder):
    """The real 270M base model (the demo model, converted once per session)."""
    return mlx_gemma3.load(demo_folder)


@pytest.mark.slow
def test_real_270m_replies_parse_and_validate_on_20_schemas_within_a_tight_budget(gemma_270m):
    """Nested objects, bounded arrays, enums, ranges, optional fields, patterns, anyOf, sampled at temperature 1.0
    with max_tokens three above each schema's shortest valid instance (written by hand in the data file, checked
    by jsonschema here): every reply parses, validates and ends "stop"."""
    model, processor = gemma_270m
    for case in REAL_CASES:
        jsonschema.validate(json.loads(case["shortest"]), case["schema"])
        budget = len(processor.tokenizer.encode(case["shortest"], add_bos=False)) + 3
        out = list(
            stream_generate(
                model, processor, case["prompt"], json_schema=case["schema"], max_tokens=budget, temp=1.0, seed=0
            )
        )
        jsonschema.validate(json.loads("".join(o.text for o in out)), case["schema"])
        assert out[-1].finish_reason == "stop" and len(out) <= budget


@pytest.mark.slow
def test_real_270m_tool_calls_through_the_server_are_valid(gemma_270m):
    """tool_choice "required" on a base model: the call parses and its arguments validate."""
    model, processor = gemma_270m
    httpd = make_server(
        ServerState(model, processor, "g270", max_tokens_limit=600, max_body_bytes=100_000), "127.0.0.1", 0
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="x", max_retries=0, timeout=300
        )
        for city in ("Oslo", "Lima"):
            reply = client.chat.completions.create(
                model="g270",
                messages=[{"role": "user", "content": f"What is the weather in {city}?"}],
                tools=[WEATHER],
                tool_choice="required",
                max_tokens=40,
            )
            (call,) = reply.choices[0].message.tool_calls
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
            assert reply.choices[0].finish_reason == "tool_calls"
    finally:
        httpd.shutdown()
        httpd.server_close()


NOTE = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "score": {"type": "number"}},
    "required": ["text", "score"],
}
NOTE_SHORTEST = '{"text": "", "score": 0}'


def tokens_of(processor, text: str) -> int:
    return len(processor.tokenizer.encode(text, add_bos=False))


class Boost:
    """A logits processor that adds `amount` to the tokens that spell one of `pieces` (the constraint, applied
    after it, still decides what is allowed)."""

    def __init__(self, processor, pieces: str, amount: float = 1e4):
        ids = {i for piece in pieces for i in processor.tokenizer.encode(piece, add_bos=False)}
        self.ids, self.amount = mx.array(sorted(ids)), amount

    def __call__(self, tokens, logits):
        hit = (mx.arange(logits.shape[-1])[:, None] == self.ids[None]).any(axis=1)
        return logits + self.amount * hit


def test_a_constrained_reply_closes_within_its_budget(tiny):
    """An unbounded string and number (a random model, pushed to write digits, never ends them by itself): with
    max_tokens at or a little above the shortest valid reply, every sampled reply is complete JSON that validates,
    and ends "stop" at the budget."""
    model, processor = tiny
    shortest = tokens_of(processor, NOTE_SHORTEST)
    for extra, seed in [(0, 0), (2, 1), (7, 2), (15, 3)]:
        out = list(
            stream_generate(
                model,
                processor,
                "Give me JSON.",
                json_schema=NOTE,
                max_tokens=shortest + extra,
                temp=1.0,
                seed=seed,
                logits_processors=[Boost(processor, "0123456789x")],
            )
        )
        jsonschema.validate(json.loads("".join(o.text for o in out)), NOTE)
        assert out[-1].finish_reason == "stop" and out[-1].finish_detail is None


def test_no_valid_reply_in_the_budget_ends_length_and_says_why(tiny, server):
    model, processor = tiny
    too_few = tokens_of(processor, NOTE_SHORTEST) - 1
    out = list(stream_generate(model, processor, "JSON", json_schema=NOTE, max_tokens=too_few))
    assert out[-1].finish_reason == "length" and len(out) == too_few
    assert f"no valid reply fits in max_tokens={too_few}" in out[-1].finish_detail
    with pytest.raises(openai.BadRequestError, match=f"max_tokens={too_few}"):
        server.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "JSON"}],
            max_tokens=too_few,
            response_format={"type": "json_schema", "json_schema": {"name": "note", "schema": NOTE}},
        )


def test_json_numbers_and_whitespace_keep_to_the_limits_unless_lifted(tiny):
    """Pushed to write digits (or spaces) forever, a number stops at 17 fraction digits (what a double keeps:
    repr(float) never needs more) and 20 integer digits, a whitespace run at 16; json_limits=False lifts both."""
    model, processor = tiny
    closed = {"type": "object", "additionalProperties": False}
    fraction = {**closed, "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["p"]}
    spaced = {**NOTE, "additionalProperties": False, "x-guidance": {"whitespace_flexible": True}}
    digits, spaces = Boost(processor, "0123456789"), Boost(processor, " ")
    ask = lambda schema, boost, **options: generate(  # noqa: E731
        model, processor, "JSON", json_schema=schema, max_tokens=60, logits_processors=[boost], **options
    )
    number = json.loads(ask(fraction, digits))["p"]
    text = ask(fraction, digits)
    assert len(re.search(r"\.(\d+)", text).group(1)) == 17 and 0 <= number <= 1
    assert len(repr(float("0." + "9" * 40)).split(".")[1]) <= 17
    whole = {**closed, "properties": {"n": {"type": "number"}}, "required": ["n"]}
    assert max(map(len, re.findall(r"\d+", ask(whole, digits)))) == 20
    assert len(re.search(r"\.(\d+)", ask(fraction, digits, json_limits=False)).group(1)) > 17
    assert max(map(len, re.findall(r"\s+", ask(spaced, spaces)))) == 16
    assert max(map(len, re.findall(r"\s+", ask(spaced, spaces, json_limits=False)))) > 16


def test_tool_calls_and_regexes_close_within_a_tight_budget(tiny):
    model, processor = tiny
    grammar = tool_call_grammar([WEATHER], "python", "required")
    shortest = tokens_of(processor, '[get_weather(city="", unit="celsius")]')
    for seed in range(2):
        reply = generate(
            model,
            processor,
            "Weather?",
            grammar=grammar,
            max_tokens=shortest + 2,
            temp=1.0,
            seed=seed,
            logits_processors=[Boost(processor, "abcxyz")],
        )
        (call,) = parse_tool_calls(reply)
        jsonschema.validate(call.arguments, WEATHER["function"]["parameters"])
    mail = r"[a-z]+@[a-z]+\.com"
    for seed in range(2):
        reply = generate(
            model,
            processor,
            "Mail?",
            regex=mail,
            max_tokens=tokens_of(processor, "a@a.com") + 1,
            temp=1.0,
            seed=seed,
            logits_processors=[Boost(processor, "abcxyz")],
        )
        assert re.fullmatch(mail, reply), reply


def test_the_shortest_finish_is_valid_and_no_longer_than_the_hand_written_one(tiny):
    """From the start of each of the 20 schemas, the finish the constraint would close with is a valid instance
    (jsonschema) no longer in tokens than the data file's hand-written shortest instance."""
    _, processor = tiny
    for case in REAL_CASES:
        finish = Constraint(processor, grammar_text(json_schema=case["schema"]), 100).closer.finish()
        jsonschema.validate(json.loads(processor.tokenizer.decode(finish)), case["schema"])
        assert len(finish) <= tokens_of(processor, case["shortest"]), case["shortest"]


def test_server_json_limits_field(server):
    """`json_limits` (our extra body field) is true or false; false is accepted and the reply still validates."""
    ask = lambda limits: server.chat.completions.create(  # noqa: E731
        model="tiny",
        messages=[{"role": "user", "content": "JSON"}],
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "note", "schema": NOTE}},
        extra_body={"json_limits": limits},
    )
    jsonschema.validate(json.loads(ask(False).choices[0].message.content), NOTE)
    with pytest.raises(openai.BadRequestError, match="'json_limits' must be true or false"):
        ask("no")

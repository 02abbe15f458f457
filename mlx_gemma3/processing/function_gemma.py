"""FunctionGemma's tool-call format: `<start_function_call>call:NAME{key:<escape>text<escape>,n:3}<end_function_call>`
read back into names and arguments, and the Lark grammar that holds a reply to valid calls. Declarations, calls and
responses in the prompt are written by the model folder's own chat template.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import json
import re

from .grammar import ordered_items

FUNCTION_GEMMA = "functiongemma"  # the tool style of a folder whose template declares FunctionGemma's functions
DECLARATION_START = "<start_function_declaration>"
CALL_START, CALL_END = "<start_function_call>", "<end_function_call>"
RESPONSE_START = "<start_function_response>"  # the model stops here to let the caller run the call
ESCAPE = "<escape>"  # strings are written between two of these; every other value is bare
BARE = re.compile(r"[^,}\]]*")
NUMBER = r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?/"


def is_function_gemma(template: str | None) -> bool:
    """Whether a chat template writes FunctionGemma's declarations (it then renders tools, calls and responses)."""
    return bool(template) and DECLARATION_START in template


def parse_calls(text: str) -> list[tuple[str, dict]] | None:
    """(name, arguments) of each call in `text`, in order; None when a call is malformed. Never evaluates it."""
    calls = []
    for chunk in text.split(CALL_START)[1:]:
        body = chunk.split(CALL_END, 1)[0].strip()
        match = re.match(r"call:([\w.\-]+)\{", body)
        if match is None:
            return None
        reader = Reader(body, match.end() - 1)
        arguments = reader.value()
        if not isinstance(arguments, dict) or body[reader.pos :].strip():
            return None
        calls.append((match.group(1), arguments))
    return calls


class Reader:
    """Reads one FunctionGemma value at `pos`: {key:value,...}, [value,...], <escape>text<escape>, or a bare
    token (a JSON number, true, false, null; anything else is kept as its text). Raises ValueError when malformed."""

    def __init__(self, text: str, pos: int):
        self.text, self.pos = text, pos

    def value(self):
        try:
            return self.read()
        except (ValueError, IndexError):
            return None

    def read(self):
        text = self.text
        if text.startswith(ESCAPE, self.pos):
            end = text.index(ESCAPE, self.pos + len(ESCAPE))
            value, self.pos = text[self.pos + len(ESCAPE) : end], end + len(ESCAPE)
            return value
        if text[self.pos] == "{":
            return self.items("}", keyed=True)
        if text[self.pos] == "[":
            return self.items("]", keyed=False)
        token = BARE.match(text, self.pos).group()
        self.pos += len(token)
        try:
            return json.loads(token)
        except json.JSONDecodeError:
            return token

    def items(self, close: str, keyed: bool):
        self.pos += 1
        out: dict | list = {} if keyed else []
        while self.text[self.pos] != close:
            if keyed:
                colon = self.text.index(":", self.pos)
                key = self.text[self.pos : colon]
                if not key or any(c in key for c in "{}[],"):
                    raise ValueError(f"bad key {key!r}")
                self.pos = colon + 1
                out[key] = self.read()
            else:
                out.append(self.read())
            if self.text[self.pos] == ",":
                self.pos += 1
            elif self.text[self.pos] != close:
                raise ValueError(f"expected ',' or {close!r} at {self.pos}")
        self.pos += 1
        return out


def calls_grammar(tools: list[tuple[str, dict]], choice: str) -> str:
    """A Lark grammar (llguidance's dialect; FunctionGemma's markers are special tokens) for one or more calls of
    `tools` — (name, JSON schema of the parameters) — each argument valid under its schema, optional ones free to be
    left out; "auto": a reply that is not a call is free prose (which cannot hold the call marker, a special token)."""
    rules = [
        "call: "
        + " | ".join(
            f"{literal('call:' + name + '{')} {members(parameters)} {literal('}')}" for name, parameters in tools
        ),
        f"value: string | NUMBER | object_any | array_any | {literal('true')} | {literal('false')} | {literal('null')}",
        f"string: {ESCAPE} TEXT {ESCAPE}",
        'object_any: "{" (KEY ":" value ("," KEY ":" value)*)? "}"',
        'array_any: "[" (value ("," value)*)? "]"',
        "TEXT: /(.|\\n)*/",
        f"NUMBER: {NUMBER}",
        "INTEGER: /-?(0|[1-9][0-9]*)/",
        "KEY: /[A-Za-z_][A-Za-z0-9_.\\-]*/",
    ]
    calls = f"({CALL_START} call {CALL_END})+ {RESPONSE_START}?"
    start = f"start: {calls}" if choice == "required" else f"start: {calls} | PROSE\nPROSE: /(.|\\n)+/"
    return start + "\n" + "\n".join(rules) + "\n"


def members(schema: dict) -> str:
    """Lark for an object's members under its schema: its properties in order, the required ones always there."""
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    items = [(f"{literal(key + ':')} {value_rule(sub)}", key in required) for key, sub in properties.items()]
    return ordered_items(items, ",") or ""


def value_rule(schema) -> str:
    """Lark for a value under a JSON schema, in FunctionGemma's syntax (strings escaped, the rest bare)."""
    schema = schema if isinstance(schema, dict) else {}
    if "enum" in schema:
        options = [
            f"{ESCAPE} {literal(v)} {ESCAPE}" if isinstance(v, str) else literal(json.dumps(v)) for v in schema["enum"]
        ]
        return "(" + " | ".join(options) + ")"
    kind = schema.get("type")
    if isinstance(kind, list):
        return "(" + " | ".join(value_rule({**schema, "type": k}) for k in kind) + ")"
    simple = {
        "string": "string",
        "integer": "INTEGER",
        "number": "NUMBER",
        "boolean": f"({literal('true')} | {literal('false')})",
        "null": literal("null"),
    }
    if kind in simple:
        return simple[kind]
    if kind == "array":
        item = value_rule(schema.get("items"))
        return f'"[" ({item} ("," {item})*)? "]"'
    if kind == "object":
        return f'"{{" {members(schema)} "}}"' if schema.get("properties") else "object_any"
    return "value"


def literal(text: str) -> str:
    return json.dumps(text)

"""Function calling for Gemma 3: tools described in the prompt, calls parsed from the reply (never executed as code), a bounded loop."""

from __future__ import annotations

import ast
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import Gemma3Error
from .function_gemma import CALL_START, FUNCTION_GEMMA, calls_grammar, is_function_gemma, parse_calls
from .grammar import JSON_LAYOUT, ordered_items

__all__ = ["Tool", "ToolCall", "ToolRun", "parse_tool_calls", "run_tools", "tool_call_grammar", "tools_prompt"]

# How calls are written: Gemma 3's documented Python or JSON forms (tools described in the user turn), or
# FunctionGemma's own tokens (tools declared by the folder's chat template).
STYLES = ("python", "json", FUNCTION_GEMMA)
PROMPTED_STYLES = STYLES[:2]
CHOICES = ("auto", "required")  # tool_choice values that constrain: a call or prose opening otherwise, a call
FENCE = re.compile(r"```[ \t]*([A-Za-z_]*)[ \t]*\n?(.*?)```", re.DOTALL)
JSON_WORDS = {"true": True, "false": False, "null": None}
PYTHON_INSTRUCTION = (
    "You have access to the functions below. To call one or more of them, answer with nothing but a "
    "Python-style list of calls, for example [name1(arg1=value1, arg2=value2), name2(arg=value)]. "
    "Do not add any other text when you call a function."
)
JSON_INSTRUCTION = (
    "You have access to the functions below. To call one of them, answer with nothing but a JSON object "
    'of the form {"name": function name, "parameters": {argument name: value}} (a JSON list of such '
    "objects calls several). Do not add any other text when you call a function."
)


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its JSON schema and, for run_tools, the Python callable."""

    name: str
    description: str
    parameters: dict
    function: Callable | None = field(default=None, compare=False)

    def schema(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def template_schema(self) -> dict:
        """The tool as chat templates take it (`tools=` of transformers' apply_chat_template): OpenAI's form."""
        return {"type": "function", "function": self.schema()}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


def as_tool(spec) -> Tool:
    """A Tool from a Python callable (type hints + docstring) or a JSON-schema dict (OpenAI's form too)."""
    if isinstance(spec, Tool):
        return spec
    if callable(spec):
        return tool_from_function(spec)
    if isinstance(spec, dict):
        return tool_from_schema(spec)
    raise Gemma3Error(f"a tool must be a function or a JSON-schema dict, got {type(spec).__name__}")


def tool_from_schema(spec: dict) -> Tool:
    body = spec.get("function", spec) if spec.get("type") == "function" else spec
    name = body.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise Gemma3Error(f"a tool schema needs a 'name' that is an identifier, got {name!r}")
    parameters = body.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise Gemma3Error(f"tool {name}: 'parameters' must be a JSON-schema object")
    return Tool(name, str(body.get("description", "")), parameters)


def tool_from_function(function: Callable) -> Tool:
    """Schema from the signature's type hints and the docstring (summary, then `name: text` lines under Args:)."""
    hints = typing.get_type_hints(function)
    summary, documented = _parse_docstring(inspect.getdoc(function) or "")
    properties, required = {}, []
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        schema, optional = _json_type(hints.get(name, str))
        if name in documented:
            schema["description"] = documented[name]
        properties[name] = schema
        if parameter.default is parameter.empty and not optional:
            required.append(name)
    parameters = {"type": "object", "properties": properties, "required": required}
    return Tool(function.__name__, summary, parameters, function)


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    summary, _, rest = doc.partition("\n\n")
    documented = {}
    in_args = False
    for line in rest.splitlines():
        stripped = line.strip()
        if stripped.lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
        elif in_args and ":" in stripped:
            name, _, text = stripped.partition(":")
            documented[name.split("(")[0].strip()] = text.strip()
        elif in_args and stripped.endswith(":"):
            in_args = False
    return " ".join(summary.split()), documented


def _json_type(hint) -> tuple[dict, bool]:
    """(JSON schema, whether None is allowed) for a type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        schema, _ = _json_type(rest[0]) if len(rest) == 1 else ({}, False)
        return schema, type(None) in args
    if origin is typing.Literal:
        return {"type": _json_type(type(args[0]))[0].get("type", "string"), "enum": list(args)}, False
    if origin in (list, tuple, set):
        return {"type": "array", "items": _json_type(args[0])[0] if args else {}}, False
    if origin is dict or hint is dict:
        return {"type": "object"}, False
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array"}
    return ({"type": simple[hint]} if hint in simple else {}), False


def template_tool_style(chat_template: str | None) -> str:
    """How a model folder calls tools: FunctionGemma's tokens when its template declares them, else Gemma 3's
    Python-style list."""
    return FUNCTION_GEMMA if is_function_gemma(chat_template) else "python"


def tools_prompt(tools, style: str = "python") -> str:
    """The text that describes the tools, in Google's documented form, for the start of a user turn."""
    if style not in PROMPTED_STYLES:
        raise Gemma3Error(
            f"tool style must be one of {PROMPTED_STYLES}, got {style!r} (FunctionGemma's tools are declared by its "
            "chat template: pass tools= to the generation)"
        )
    schemas = json.dumps([as_tool(t).schema() for t in tools], indent=2, ensure_ascii=False)
    instruction = PYTHON_INSTRUCTION if style == "python" else JSON_INSTRUCTION
    return f"{instruction}\n\n{schemas}\n"


def with_tools(messages: list[dict], tools, style: str = "python") -> list[dict]:
    """The conversation with the tool description put in front of the first user turn (Gemma has no tool role)."""
    messages = [dict(m) for m in messages]
    first = next((m for m in messages if m.get("role") == "user"), None)
    if first is None:
        raise Gemma3Error("tools need a conversation with a user turn")
    prompt = tools_prompt(tools, style)
    content = first["content"]
    first["content"] = (
        prompt + "\n" + content if isinstance(content, str) else [{"type": "text", "text": prompt}, *content]
    )
    return messages


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The calls in a reply, in any style (FunctionGemma's tokens, or Python or JSON, fenced or bare); [] for prose.
    Never evaluates the text."""
    if CALL_START in text:
        return [ToolCall(name, arguments) for name, arguments in parse_calls(text) or []]
    for candidate in _candidates(text):
        calls = _json_calls(candidate)
        if calls is None:
            calls = _python_calls(candidate)
        if calls:
            return calls
    return []


def _candidates(text: str) -> list[str]:
    fenced = [body.strip() for _, body in FENCE.findall(text)]
    return [*fenced, text.strip()] if fenced else [text.strip()]


def _json_calls(text: str) -> list[ToolCall] | None:
    if text[:1] not in "[{":
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items):
        return None
    calls = []
    for item in items:
        arguments = item.get("parameters", item.get("arguments", {}))
        if isinstance(arguments, str):  # OpenAI serialises arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(item["name"], arguments))
    return calls


def _python_calls(text: str) -> list[ToolCall]:
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError):
        return []
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    if not nodes or not all(isinstance(n, ast.Call) for n in nodes):
        return []
    calls = []
    for node in nodes:
        name = _dotted(node.func)
        if name is None or node.args or any(k.arg is None for k in node.keywords):
            return []  # positional or **-arguments: not the documented form
        try:
            calls.append(ToolCall(name, {k.arg: _literal(k.value) for k in node.keywords}))
        except ValueError:
            return []
    return calls


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _literal(node) -> Any:
    """A Python literal (JSON's true/false/null too); anything else — names, calls, operators — is refused."""
    if isinstance(node, ast.Name) and node.id in JSON_WORDS:
        return JSON_WORDS[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def tool_call_grammar(tools, style: str = "python", choice: str = "required", parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect) for replies that call the tools in `style`, each call's arguments valid
    under its tool's schema. "required": the reply is a call; "auto": a reply that opens like a call ('[' in the
    python style, '{' or '[' in the json style) must be one, any other reply is free prose. Not `parallel`: one
    call per reply (the json style's grammar always takes one)."""
    if style not in STYLES:
        raise Gemma3Error(f"tool style must be one of {STYLES}, got {style!r}")
    if choice not in CHOICES:
        raise Gemma3Error(f"tool choice must be one of {CHOICES}, got {choice!r}")
    known = [as_tool(t) for t in tools]
    if not known:
        raise Gemma3Error("a tool-call grammar needs at least one tool")
    if style == FUNCTION_GEMMA:
        return calls_grammar([(t.name, t.parameters) for t in known], choice)
    if style == "python":
        more = '(", " call)*' if parallel else ""
        calls = f'"[" call {more} "]"\ncall: ' + " | ".join(_python_call(t) for t in known)
        opening = "\\["
    else:
        schema = {"anyOf": [_json_call_schema(t) for t in known], "x-guidance": JSON_LAYOUT}
        calls = f"%json {json.dumps(schema)}"
        opening = "\\[{"
    start = "calls" if choice == "required" else "calls | PROSE"
    prose = f"\nPROSE: /[^{opening}\\s][\\s\\S]*/" if choice == "auto" else ""
    return f"start: {start}\ncalls: {calls}{prose}\n"


def _python_call(tool: Tool) -> str:
    """`name(k=v, ...)`: the schema's properties in its order, the required ones always, the others optional."""
    properties = tool.parameters.get("properties") or {}
    required = set(tool.parameters.get("required") or [])
    items = [(f"{json.dumps(name + '=')} {_embedded(schema)}", name in required) for name, schema in properties.items()]
    return f'{json.dumps(tool.name + "(")} {ordered_items(items, ", ") or ""} ")"'


def _embedded(schema) -> str:
    """A JSON schema inlined in a Lark grammar, laid out compactly."""
    schema = dict(schema) if isinstance(schema, dict) else {}
    schema.setdefault("x-guidance", JSON_LAYOUT)
    return f"%json {json.dumps(schema)}"


def _json_call_schema(tool: Tool) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "parameters": tool.parameters},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


def call_tool(tools: dict[str, Tool], call: ToolCall) -> Any:
    """Run one call; a wrong name or wrong arguments come back as an error text for the model to read."""
    tool = tools.get(call.name)
    if tool is None or tool.function is None:
        return {"error": f"unknown function {call.name!r}"}
    try:
        return tool.function(**call.arguments)
    except TypeError as e:
        return {"error": f"bad arguments for {call.name}: {e}"}


def tool_results_text(calls: list[ToolCall], results: list[Any]) -> str:
    """The next user turn: each result in a ```tool_output``` fence, as Google's guide shows."""
    blocks = [
        f"```tool_output\n{json.dumps({'name': c.name, 'result': r}, ensure_ascii=False, default=str)}\n```"
        for c, r in zip(calls, results)
    ]
    return "\n".join(blocks)


@dataclass
class ToolRun:
    """What run_tools did: the final reply, each round's calls and results, and whether it stopped early."""

    reply: str
    rounds: list[tuple[list[ToolCall], list[Any]]]
    exhausted: bool


def run_tools(
    chat, content: str, tools, style: str = "python", max_rounds: int = 4, constrained: bool = False, **options
) -> ToolRun:
    """Ask `chat` (a Chat) with tools; while the reply is a call, run it and send the results back as the
    next user turn; stop at a reply without calls or after `max_rounds` rounds of calls. `constrained`: a reply
    that opens a call is held to a call with valid arguments (tool_call_grammar's "auto")."""
    known = {t.name: t for t in map(as_tool, tools)}
    if constrained:
        options = {**options, "grammar": tool_call_grammar(list(known.values()), style, "auto")}
    message = tools_prompt(list(known.values()), style) + "\n" + content
    rounds = []
    reply = chat.send(message, **options)
    for _ in range(max_rounds):
        calls = parse_tool_calls(reply)
        if not calls:
            return ToolRun(reply, rounds, exhausted=False)
        results = [call_tool(known, call) for call in calls]
        rounds.append((calls, results))
        reply = chat.send(tool_results_text(calls, results), **options)
    return ToolRun(reply, rounds, exhausted=bool(parse_tool_calls(reply)))

"""OpenAI request bodies → checked requests: accepted fields, JSON types, chat messages, image sources.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Gemma3Error
from ..generation.sample import TEMP_RANGE
from ..processing.function_gemma import FUNCTION_GEMMA
from ..processing.grammar import grammar_text
from ..processing.prompt import LANGUAGE_KEYS
from ..processing.tools import ToolCall, as_tool, tool_call_grammar, tool_results_text, with_tools

# Fields a request may carry. Harmless ones clients send by default are accepted and ignored (model, user,
# parallel_tool_calls); n, presence_penalty and frequency_penalty only at their no-op values (1, 0, 0).
# Anything else is a 400 naming the field, never silently ignored.
COMMON_FIELDS = {
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
}
CHAT_FIELDS = COMMON_FIELDS | {
    "messages",
    "max_completion_tokens",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "logprobs",
    "top_logprobs",
    "response_format",
    "chat_template_kwargs",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
MAX_TOP_LOGPROBS = 20


class RequestError(Exception):
    """A client mistake: becomes an error body in the endpoint's shape with this HTTP status (`code`: OpenAI's
    machine-readable code, such as model_not_found)."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        headers: dict | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.param, self.headers, self.code = status, param, headers or {}, code


def openai_error(error: RequestError) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": str(error), "type": kind, "param": error.param, "code": error.code}}


@dataclass
class Request:
    """A checked request: the prompt (Gemma chat messages or text) and how to generate and reply."""

    chat: bool
    prompt: object
    options: dict
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    tools: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


def parse_chat(body: dict, max_tokens_limit: int, image_dirs: tuple[Path, ...] = (), style: str = "python") -> Request:
    """A chat request for a model whose tool calls take `style` (Processor.tool_style): FunctionGemma's
    template renders the tools, calls and results itself; for Gemma 3 they become text turns."""
    check_fields(body, CHAT_FIELDS)
    tools = chat_tools(body)
    options = {**generation_options(body, max_tokens_limit), **constraint_options(body, tools, style)}
    if style == FUNCTION_GEMMA:
        messages = to_template_messages(required(body, "messages", list), image_dirs)
        options["tools"] = tools or None
    else:
        messages = to_gemma_messages(required(body, "messages", list), image_dirs)
        if tools:
            messages = with_tools(messages, tools)
    logprobs = flag(body, "logprobs")
    top = number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, int)
    if top and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    options["chat_template_kwargs"] = template_kwargs(body)
    return Request(
        True,
        messages,
        options,
        stop_strings(body),
        flag(body, "stream"),
        include_usage(body),
        bool(tools),
        logprobs,
        top,
    )


def parse_completion(body: dict, max_tokens_limit: int) -> Request:
    check_fields(body, COMPLETION_FIELDS)
    options = {**generation_options(body, max_tokens_limit), "use_chat_template": False}
    return Request(
        False, required(body, "prompt", str), options, stop_strings(body), flag(body, "stream"), include_usage(body)
    )


def check_fields(body: dict, accepted: set[str]) -> None:
    unknown = sorted(set(body) - accepted)
    if unknown:
        raise RequestError(
            f"unsupported field(s): {', '.join(unknown)}; this server accepts {', '.join(sorted(accepted))}",
            param=unknown[0],
        )
    if body.get("n") is not None and (type(body["n"]) is not int or body["n"] != 1):
        raise RequestError("'n' must be 1: this server makes one choice per request", param="n")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0) or isinstance(body.get(key), bool):
            raise RequestError(f"'{key}' is not supported (only 0); use 'repetition_penalty' instead", param=key)
    if not isinstance(body.get("user", ""), str) or not isinstance(body.get("model", ""), str):
        raise RequestError("'model' and 'user' must be strings", param="model")


def flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"'{key}' must be true or false, got {json.dumps(value)[:40]}", param=key)
    return bool(value)


def include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError("'stream_options' must be an object with only 'include_usage'", param="stream_options")
    return flag(options, "include_usage")


def chat_tools(body: dict) -> list:
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none", "required") and forced_name(choice) is None:
        raise RequestError(
            '\'tool_choice\' must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RequestError("'tools' must be a list of objects", param="tools")
    if not tools or choice == "none":
        if choice not in (None, "none"):
            raise RequestError("'tool_choice' asks for a call but the request has no 'tools'", param="tool_choice")
        return []
    try:
        return [as_tool(t) for t in tools]
    except Gemma3Error as e:
        raise RequestError(str(e), param="tools") from None


def forced_name(choice) -> str | None:
    """The function a tool_choice object names, or None when it is not {"type": "function", "function": {"name"}}."""
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(choice.get("function"), dict):
        return None
    name = choice["function"].get("name")
    return name if isinstance(name, str) and name else None


def template_kwargs(body: dict) -> dict | None:
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and (not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs)):
        raise RequestError(
            "'chat_template_kwargs' must be an object of template variables", param="chat_template_kwargs"
        )
    return kwargs


def constraint_options(body: dict, tools: list, style: str = "python") -> dict:
    """The grammar a reply must follow: tool calls (tool_choice "required" or a named function; "auto" holds a
    reply that opens a call to a valid call), else response_format's JSON; {} for free text."""
    schema = response_schema(body.get("response_format"))
    if tools:
        if schema is not None:
            raise RequestError(
                "'response_format' and 'tools' cannot constrain one reply together: send one", param="response_format"
            )
        return {"grammar": tools_grammar(tools, body.get("tool_choice") or "auto", style)}
    return {} if schema is None else {"json_schema": checked_schema(schema, "response_format")}


def checked_schema(schema: dict, param: str) -> dict:
    """A JSON schema the reply can be held to, or a 400 saying why not."""
    try:
        grammar_text(json_schema=schema)
    except Gemma3Error as e:
        raise RequestError(f"{param}: {e}", param=param) from None
    return schema


def tools_grammar(tools: list, choice, style: str = "python") -> str:
    return call_grammar(tools, "auto" if choice == "auto" else "required", forced_name(choice), style=style)


def call_grammar(tools: list, mode: str, name: str | None = None, parallel: bool = True, style: str = "python") -> str:
    """The grammar of a reply under a tool choice: "auto" (a reply that opens a call is a valid call) or
    "required" (a call), to the tool `name` only when given, several calls in one reply unless not `parallel`,
    written in the model's tool-call `style`."""
    if name is not None:
        tools = [t for t in tools if t.name == name]
        if not tools:
            raise RequestError(
                f"'tool_choice' names {name!r}, which is not among the request's tools", param="tool_choice"
            )
    try:
        return tool_call_grammar(tools, style, mode, parallel)
    except Gemma3Error as e:
        raise RequestError(str(e), param="tools") from None


def response_schema(response_format) -> dict | None:
    """The JSON schema a response_format asks for: {"type": "json_object"} any object, {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}} that schema; None for {"type": "text"} or no response_format."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise RequestError(
                "response_format.json_schema must be an object with a 'schema' object", param="response_format"
            )
        unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if unknown:
            raise RequestError(
                f"response_format.json_schema has unsupported field(s): {', '.join(unknown)}", param="response_format"
            )
        return spec.get("schema", {})
    raise RequestError(
        '\'response_format\' must be {"type": "text"}, {"type": "json_object"} or '
        '{"type": "json_schema", "json_schema": {...}}',
        param="response_format",
    )


def required(body: dict, key: str, kind: type):
    value = body.get(key)
    if not isinstance(value, kind) or not value:
        raise RequestError(f"'{key}' must be a non-empty {kind.__name__}", param=key)
    return value


def number(body: dict, key: str, default, low, high, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"'{key}' must be {'an integer' if kind is int else 'a number'}", param=key)
    if not low <= value <= high:
        raise RequestError(f"'{key}' must lie in [{low}, {high}], got {value}", param=key)
    return kind(value)


def generation_options(body: dict, limit: int) -> dict:
    return {
        "max_tokens": max_tokens(body, limit),
        "temp": number(body, "temperature", 0.0, *TEMP_RANGE),
        "top_p": number(body, "top_p", 1.0, 1e-9, 1.0),
        "top_k": number(body, "top_k", 0, 0, 2**20, int),
        "min_p": number(body, "min_p", 0.0, 0.0, 1.0),
        "repetition_penalty": number(body, "repetition_penalty", None, 1e-3, 10.0),
        "seed": number(body, "seed", None, 0, 2**32 - 1, int),
    }


def max_tokens(body: dict, limit: int) -> int:
    """max_completion_tokens (the current name) or max_tokens (its deprecated alias); both must agree."""
    default = min(512, limit)
    old, new = (
        number(body, "max_tokens", None, 1, limit, int),
        number(body, "max_completion_tokens", None, 1, limit, int),
    )
    if old is not None and new is not None and old != new:
        raise RequestError("'max_tokens' and 'max_completion_tokens' differ: send one", param="max_completion_tokens")
    return new or old or default


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError("'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    return stops


def to_gemma_messages(messages: list, image_dirs: tuple[Path, ...] = ()) -> list[dict]:
    """OpenAI chat messages → ours: images from data URLs or allowed paths, developer turns as system turns,
    tool calls and tool results as text turns (a result named by the function of the call it answers)."""
    out: list[dict] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role'", param="messages")
        role = message["role"]
        if role == "tool":
            append_turn(
                out,
                "user",
                tool_results_text([ToolCall(_tool_name(message, call_names), {})], [message.get("content")]),
            )
        elif role == "assistant" and message.get("tool_calls"):
            append_turn(out, "assistant", "[" + ", ".join(_call_text(c, call_names) for c in _calls(message, i)) + "]")
        elif role in ("system", "developer", "user", "assistant"):
            append_turn(out, "system" if role == "developer" else role, _content(message.get("content"), i, image_dirs))
        else:
            raise RequestError(
                f"messages[{i}] has role {role!r}: use system, developer, user, assistant or tool", param="messages"
            )
    return out


def to_template_messages(messages: list, image_dirs: tuple[Path, ...] = ()) -> list[dict]:
    """OpenAI chat messages → the messages a tool-calling template renders (transformers' convention): turns kept
    as they are, tool calls with their arguments as objects, each tool result named by the function it answers
    (a result that is a JSON object passed as one)."""
    out: list[dict] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
        ):
            raise RequestError(
                f"messages[{i}] must be an object whose 'role' is system, developer, user, assistant or tool",
                param="messages",
            )
        role, content = message["role"], message.get("content")
        turn: dict = {"role": role}
        if role == "tool":
            turn.update(name=_tool_name(message, call_names), content=_result(content, i))
        elif content is not None or not message.get("tool_calls"):
            turn["content"] = _content(content, i, image_dirs)
        if role == "assistant" and message.get("tool_calls"):
            turn["tool_calls"] = [_template_call(c, call_names) for c in _calls(message, i)]
        out.append(turn)
    return out


def _template_call(call: dict, call_names: dict[str, str]) -> dict:
    function = call["function"]
    arguments = json_arguments(function.get("arguments"), "messages")
    if isinstance(call.get("id"), str):
        call_names[call["id"]] = str(function.get("name"))
    return {"type": "function", "function": {"name": function.get("name"), "arguments": arguments}}


def _result(content, i: int):
    """A tool result: its text (a list of text parts joined), or the object it holds when it is a JSON object."""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
    try:
        value = json.loads(content)
    except json.JSONDecodeError:
        return content
    return value if isinstance(value, dict) else content


def append_turn(out: list[dict], role: str, content) -> None:
    """Consecutive turns of one role (several tool results, say) merge into one, as Gemma's roles alternate."""
    if out and out[-1]["role"] == role and role != "system":
        previous = out[-1]["content"]
        as_items = lambda c: c if isinstance(c, list) else [{"type": "text", "text": c}]  # noqa: E731
        out[-1]["content"] = (
            previous + "\n" + content
            if isinstance(previous, str) and isinstance(content, str)
            else [*as_items(previous), *as_items(content)]
        )
    else:
        out.append({"role": role, "content": content})


def _tool_name(message: dict, call_names: dict[str, str]) -> str:
    """The function a tool result answers: its call's name from the earlier assistant tool_calls."""
    return call_names.get(message.get("tool_call_id")) or str(message.get("name") or "tool")


def _calls(message: dict, i: int) -> list[dict]:
    calls = message["tool_calls"]
    if not isinstance(calls, list) or not all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls
    ):
        raise RequestError(f"messages[{i}].tool_calls must be a list of {{'function': {{...}}}}", param="messages")
    return calls


def _call_text(call: dict, call_names: dict[str, str]) -> str:
    function = call["function"]
    if isinstance(call.get("id"), str):
        call_names[call["id"]] = str(function.get("name"))
    return call_text(str(function.get("name")), json_arguments(function.get("arguments"), "messages"))


def json_arguments(arguments, param: str) -> dict:
    """A call's arguments from their JSON text (as OpenAI sends them): an object, or a 400."""
    try:
        value = json.loads(arguments or "{}")
    except (json.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, dict):
        raise RequestError("a tool call's arguments must be a JSON object string", param=param)
    return value


def call_text(name: str, arguments: dict) -> str:
    """A call as the model writes one in the prompt's python style: name(k=v, ...)."""
    return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")"


def _content(content, i: int, image_dirs: tuple[Path, ...]):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"messages[{i}].content must be a string or a list of parts", param="messages")
    items = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            codes = {k: part[k] for k in LANGUAGE_KEYS if isinstance(part.get(k), str)}  # TranslateGemma's pair
            items.append({"type": "text", "text": part["text"], **codes})
        elif kind == "image_url":
            url = (
                (part.get("image_url") or {}).get("url")
                if isinstance(part.get("image_url"), dict)
                else part.get("image_url")
            )
            items.append({"type": "image", "image": image_source(url, f"messages[{i}]", image_dirs)})
        else:
            raise RequestError(
                f"messages[{i}]: content parts must be 'text' (with a string) or 'image_url'", param="messages"
            )
    return items


def image_source(url, where: str, image_dirs: tuple[Path, ...], param: str = "messages"):
    """Bytes from a data URL, or a local path inside one of `image_dirs` (none: local paths are refused); `where`
    names the part of the request in errors (e.g. "messages[2]")."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}: image_url needs a url", param=param)
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.split(",", 1)[1], validate=True)
        except (IndexError, binascii.Error):
            raise RequestError(f"{where}: the image data URL is not valid base64", param=param) from None
    if url.startswith(("http://", "https://")):
        raise RequestError(f"{where}: remote image URLs are not fetched; send a data URL", param=param)
    if not image_dirs:
        raise RequestError(
            f"{where}: local image paths are refused; send a data URL (or start the server "
            "with --allowed-image-dir DIR)",
            param=param,
        )
    path = Path(url.removeprefix("file://")).resolve()
    if not any(path.is_relative_to(folder) for folder in image_dirs):
        raise RequestError(f"{where}: image path outside the allowed image folders", param=param)
    return str(path)

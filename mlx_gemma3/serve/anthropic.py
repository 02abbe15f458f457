"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API — system, content blocks (text,
base64 images, tool_use, tool_result), tools and tool_choice (constrained), its replies, events and errors.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from pathlib import Path

from ..errors import Gemma3Error
from ..processing.tools import ToolCall, as_tool, tool_results_text, with_tools
from .reply import Delta, Ending, Usage, sse
from .requests import (
    Request,
    RequestError,
    append_turn,
    call_grammar,
    call_text,
    check_fields,
    flag,
    generation_options,
    image_source,
    number,
)

MESSAGES_PATH, COUNT_TOKENS_PATH = "/v1/messages", "/v1/messages/count_tokens"
COUNT_FIELDS = {"model", "messages", "system", "tools", "tool_choice", "thinking"}
# The API's fields, and this server's sampling extensions (as on its OpenAI endpoints); cache_control and
# service_tier are hints with nothing to do here.
MESSAGE_FIELDS = COUNT_FIELDS | {
    "max_tokens",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "metadata",
    "service_tier",
    "cache_control",
    "seed",
    "min_p",
    "repetition_penalty",
}
STOP_REASONS = {
    "stop": "end_turn",
    "dead_end": "end_turn",
    "length": "max_tokens",
    "stop_string": "stop_sequence",
    "tool_calls": "tool_use",
}
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


def error_body(error: RequestError) -> dict:
    """The API's error body: {"type": "error", "error": {"type", "message"}}."""
    kind = ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": str(error)}}


def messages(exchange) -> None:
    body = exchange.read_json()
    request = parse_messages(body, exchange.state.max_tokens_limit, exchange.state.image_dirs)
    served = exchange.served_model(body.get("model"))
    events = exchange.generate(served, request)
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    if request.stream:
        exchange.send_stream(MessageStream(message_id, served.name), events)
    else:
        *_, ending = events
        exchange.send_json(200, {**message_head(message_id, served.name), **message_end(ending)})


def count_tokens(exchange) -> None:
    body = exchange.read_json()
    check_fields(body, COUNT_FIELDS)
    request = parse_messages({**body, "max_tokens": 1}, exchange.state.max_tokens_limit, exchange.state.image_dirs)
    served = exchange.served_model(body.get("model"))
    exchange.send_json(200, {"input_tokens": len(exchange.prepare(served, request).ids)})


def parse_messages(body: dict, max_tokens_limit: int, image_dirs: tuple[Path, ...] = ()) -> Request:
    check_fields(body, MESSAGE_FIELDS)
    if body.get("max_tokens") is None:
        raise RequestError("'max_tokens' is required (the most tokens the reply may have)", param="max_tokens")
    number(body, "max_tokens", None, 1, max_tokens_limit, int)
    check_thinking(body.get("thinking"))
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise RequestError("'metadata' must be an object", param="metadata")
    tools = message_tools(body.get("tools"))
    choice = body.get("tool_choice")
    grammar = tool_choice_grammar(tools, choice)
    turns = to_gemma_messages(body.get("messages"), body.get("system"), image_dirs)
    if tools and grammar is not None:
        turns = with_tools(turns, tools)
    options = generation_options(body, max_tokens_limit)
    if grammar is not None:
        options["grammar"] = grammar
    stream = flag(body, "stream")
    return Request(True, turns, options, stop_sequences(body.get("stop_sequences")), stream, tools=grammar is not None)


def check_thinking(thinking) -> None:
    if thinking is not None and thinking != {"type": "disabled"}:
        raise RequestError(
            'Gemma 3 does not think before it replies: leave \'thinking\' out or send {"type": "disabled"}',
            param="thinking",
        )


def stop_sequences(stops) -> list[str]:
    if stops is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop_sequences' must be a list of non-empty strings", param="stop_sequences")
    return stops


def message_tools(tools) -> list:
    """The request's tools: {"name", "description", "input_schema"} each."""
    if tools is None:
        return []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RequestError("'tools' must be a list of objects", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom") or not isinstance(tool.get("input_schema"), dict):
            raise RequestError(
                f"tools[{i}] must be a client tool {{'name', 'description', 'input_schema'}} "
                "(this server runs no server tools)",
                param="tools",
            )
        spec = {
            "name": tool.get("name"),
            "description": tool.get("description", ""),
            "parameters": tool["input_schema"],
        }
        try:
            out.append(as_tool(spec))
        except Gemma3Error as e:
            raise RequestError(f"tools[{i}]: {e}", param="tools") from None
    return out


def tool_choice_grammar(tools: list, choice) -> str | None:
    """The grammar of the reply under `tool_choice` (auto when left out): "auto" holds a reply that opens a call
    to a valid call, "any" asks for a call, "tool" for a call to the tool it names; None: the reply does not
    call (no tools, or "none")."""
    kind = "auto" if choice is None else choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise RequestError(
            '\'tool_choice\' must be {"type": "auto"}, {"type": "any"}, {"type": "tool", "name": ...} '
            'or {"type": "none"}',
            param="tool_choice",
        )
    if kind == "none" or not tools and choice is None:
        return None
    if not tools:
        raise RequestError("'tool_choice' asks for a tool but the request has no 'tools'", param="tool_choice")
    name = choice.get("name") if kind == "tool" else None
    if kind == "tool" and not isinstance(name, str):
        raise RequestError("a 'tool' tool_choice needs the tool's 'name'", param="tool_choice")
    parallel = not flag(choice or {}, "disable_parallel_tool_use")
    return call_grammar(tools, "auto" if kind == "auto" else "required", name, parallel)


def to_gemma_messages(turns, system, image_dirs: tuple[Path, ...] = ()) -> list[dict]:
    """The API's system and messages → ours: text and images as content items, tool_use blocks as the calls the
    model writes, tool_result blocks as text turns named by the function of the call they answer."""
    if not isinstance(turns, list) or not turns:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out: list[dict] = []
    if system is not None:
        out.append({"role": "system", "content": system_text(system)})
    names: dict[str, str] = {}  # tool_use id → the tool's name
    for i, message in enumerate(turns):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise RequestError(f"messages[{i}] must be an object with 'role' user or assistant", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            append_turn(out, role, content)
        elif isinstance(content, list) and content:
            append_turn(out, role, blocks_content(content, role, f"messages[{i}]", names, image_dirs))
        else:
            raise RequestError(f"messages[{i}].content must be a string or a list of blocks", param="messages")
    if out[-1]["role"] != "user":
        raise RequestError(
            "the last message must be the user's: continuing an assistant message (prefill) is not supported",
            param="messages",
        )
    return out


def system_text(system) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in system):
        return "\n".join(str(block.get("text", "")) for block in system)
    raise RequestError("'system' must be a string or a list of text blocks", param="system")


def blocks_content(blocks: list, role: str, where: str, names: dict[str, str], image_dirs: tuple[Path, ...]):
    """A message's blocks as our content: a string when it is all text, else a list of text and image items."""
    items, calls = [], []
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        here = f"{where}.content[{j}]"
        if kind == "text" and isinstance(block.get("text"), str):
            items.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user":
            items.append({"type": "image", "image": image_bytes(block.get("source"), here, image_dirs)})
        elif kind == "tool_use" and role == "assistant":
            name, arguments = block.get("name"), block.get("input")
            if not isinstance(name, str) or not isinstance(arguments, dict):
                raise RequestError(f"{here}: a tool_use block needs a 'name' and an 'input' object", param="messages")
            names[str(block.get("id"))] = name
            calls.append(call_text(name, arguments))
        elif kind == "tool_result" and role == "user":
            items.append({"type": "text", "text": tool_result_text(block, here, names)})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # a client's echo of another model's reasoning: Gemma 3 has none to read
        else:
            raise RequestError(
                f"{here}: a {role} message's blocks are "
                + ("text, image and tool_result" if role == "user" else "text and tool_use")
                + f", got {kind!r}",
                param="messages",
            )
    if calls:
        items.append({"type": "text", "text": "[" + ", ".join(calls) + "]"})
    if all(item["type"] == "text" for item in items):
        return "\n".join(item["text"] for item in items)
    return items


def tool_result_text(block: dict, where: str, names: dict[str, str]) -> str:
    content = block.get("content", "")
    if isinstance(content, list):
        if not all(isinstance(b, dict) and b.get("type") == "text" for b in content):
            raise RequestError(f"{where}: a tool_result's content must be text (blocks of text)", param="messages")
        content = "\n".join(str(b.get("text", "")) for b in content)
    if not isinstance(content, str):
        raise RequestError(f"{where}: a tool_result's content must be a string or text blocks", param="messages")
    result = {"error": content} if block.get("is_error") else content
    return tool_results_text([ToolCall(names.get(str(block.get("tool_use_id")), "tool"), {})], [result])


def image_bytes(source, where: str, image_dirs: tuple[Path, ...]):
    """An image block's source: base64 data, or a URL (a data URL, or a path in an allowed image folder)."""
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "url":
        return image_source(source.get("url"), where, image_dirs)
    if kind != "base64" or source.get("media_type") not in IMAGE_TYPES or not isinstance(source.get("data"), str):
        raise RequestError(
            f"{where}: an image's source must be {{'type': 'base64', 'media_type': one of {', '.join(IMAGE_TYPES)}, "
            "'data': ...}",
            param="messages",
        )
    try:
        return base64.b64decode(source["data"], validate=True)
    except binascii.Error:
        raise RequestError(f"{where}: the image data is not valid base64", param="messages") from None


def usage_json(usage: Usage) -> dict:
    """The API's usage: input_tokens are the prompt tokens read, cache_read_input_tokens those the prompt cache
    served (together: the prompt)."""
    return {
        "input_tokens": usage.prefilled_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
    }


def message_head(message_id: str, model_id: str) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model_id}


def message_end(ending: Ending) -> dict:
    """The content, stop reason and usage of a whole message."""
    text = [{"type": "text", "text": ending.text}] if ending.text else []
    return {
        "content": text + [tool_use_block(call) for call in ending.calls],
        "stop_reason": STOP_REASONS[ending.reason],
        "stop_sequence": ending.stop_string,
        "usage": usage_json(ending.usage),
    }


def tool_use_block(call: ToolCall, arguments: dict | None = None) -> dict:
    """A tool_use block for a call (with `arguments` as its input instead, when given)."""
    given = call.arguments if arguments is None else arguments
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name, "input": given}


class MessageStream:
    """A message as the API's events: message_start and a ping, then each content block (content_block_start,
    its deltas: text_delta or input_json_delta, content_block_stop), message_delta (the stop reason and the
    usage), message_stop."""

    def __init__(self, message_id: str, model_id: str):
        self.message_id, self.model_id = message_id, model_id

    def frames(self, events):
        index, text_open = -1, False
        for n, event in enumerate(events):
            if n == 0:
                usage = {**usage_json(event.usage), "output_tokens": 0}
                message = {**message_head(self.message_id, self.model_id), "content": [], "usage": usage}
                yield self.event("message_start", message={**message, "stop_reason": None, "stop_sequence": None})
                yield self.event("ping")
            if isinstance(event, Delta):
                if not text_open:
                    index, text_open = index + 1, True
                    yield self.event("content_block_start", index=index, content_block={"type": "text", "text": ""})
                yield self.event("content_block_delta", index=index, delta={"type": "text_delta", "text": event.text})
                continue
            if text_open:
                yield self.event("content_block_stop", index=index)
            for call in event.calls:
                index += 1
                yield self.event("content_block_start", index=index, content_block=tool_use_block(call, {}))
                partial = json.dumps(call.arguments, ensure_ascii=False)
                yield self.event(
                    "content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": partial}
                )
                yield self.event("content_block_stop", index=index)
            end = {"stop_reason": STOP_REASONS[event.reason], "stop_sequence": event.stop_string}
            yield self.event("message_delta", delta=end, usage=usage_json(event.usage))
            yield self.event("message_stop")

    def event(self, kind: str, **fields) -> bytes:
        return sse({"type": kind, **fields}, kind)

    def error(self, error: RequestError) -> bytes:
        return sse(error_body(error), "error")

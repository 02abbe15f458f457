"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API — input items (messages, images,
function calls and their outputs), instructions, function tools, text.format (constrained), output items and
their events, and stored responses that a later request continues (previous_response_id) from the prompt cache.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..errors import Gemma3Error
from ..processing.tools import ToolCall, as_tool, tool_results_text, with_tools
from .reply import Delta, Ending, sse
from .requests import (
    Request,
    RequestError,
    append_turn,
    call_grammar,
    call_text,
    check_fields,
    checked_schema,
    flag,
    generation_options,
    image_source,
    json_arguments,
    number,
    openai_error,
)

RESPONSES_PATH = "/v1/responses"
STORED_RESPONSES = 100  # responses kept in memory (least recently used dropped first)
# The API's fields this server acts on or may accept as they are, and its sampling extensions.
RESPONSE_FIELDS = {
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "text",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "store",
    "previous_response_id",
    "metadata",
    "parallel_tool_calls",
    "user",
    "truncation",
    "include",
    "reasoning",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
}
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty")


@dataclass(frozen=True)
class Stored:
    """A stored response: its body (what GET returns) and its conversation with its own reply (what a request
    that names it as previous_response_id continues; instructions are not carried over, as the API says)."""

    body: dict
    turns: list[dict]


class ResponseStore:
    """Responses kept in memory by id: at most `max_entries`, the least recently used dropped first (0: none)."""

    def __init__(self, max_entries: int = STORED_RESPONSES):
        self.max_entries = max_entries
        self.entries: OrderedDict[str, Stored] = OrderedDict()
        self.lock = threading.Lock()

    def put(self, response_id: str, stored: Stored) -> None:
        with self.lock:
            self.entries[response_id] = stored
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        with self.lock:
            stored = self.entries.get(response_id)
            if stored is not None:
                self.entries.move_to_end(response_id)
            return stored

    def delete(self, response_id: str) -> bool:
        with self.lock:
            return self.entries.pop(response_id, None) is not None


@dataclass(frozen=True)
class ResponseRequest:
    """A checked request: what to generate, the conversation before instructions and tools are put in (what is
    stored), whether to store the response, and the fields the response repeats."""

    request: Request
    turns: list[dict]
    store: bool
    echo: dict


def create(exchange) -> None:
    state = exchange.state
    body = exchange.read_json()
    parsed = parse_response(body, state.max_tokens_limit, state.image_dirs, state.responses)
    served = exchange.served_model(body.get("model"))
    events = exchange.generate(served, parsed.request)
    reply = ResponseReply(parsed, served.name, state.responses)
    if parsed.request.stream:
        exchange.send_stream(ResponseStream(reply), events)
    else:
        *_, ending = events
        exchange.send_json(200, reply.finish(ending))


def retrieve(exchange) -> None:
    exchange.send_json(200, stored(exchange).body)


def delete(exchange) -> None:
    stored(exchange)
    exchange.state.responses.delete(exchange.path_id)
    exchange.send_json(200, {"id": exchange.path_id, "object": "response", "deleted": True})


def stored(exchange) -> Stored:
    found = exchange.state.responses.get(exchange.path_id)
    if found is None:
        raise RequestError(f"no stored response with id {exchange.path_id!r} (kept in memory, a bounded number)", 404)
    return found


def parse_response(body: dict, limit: int, image_dirs: tuple[Path, ...], store: ResponseStore) -> ResponseRequest:
    check_fields(body, RESPONSE_FIELDS)
    for key, allowed in (("include", (None, [])), ("reasoning", (None,)), ("truncation", (None, "disabled"))):
        if body.get(key) not in allowed:
            raise RequestError(f"'{key}' is not supported here (leave it out)", param=key)
    previous = body.get("previous_response_id")
    turns = []
    if previous is not None:
        found = store.get(previous) if isinstance(previous, str) else None
        if found is None:
            raise RequestError(
                f"no stored response with id {previous!r} to continue (kept in memory, a bounded number)",
                param="previous_response_id",
            )
        turns = list(found.turns)
    turns += input_turns(body.get("input"), image_dirs)
    tools, grammar = function_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    text_format, constraint = format_constraint(body.get("text"))
    if grammar is not None and constraint:
        raise RequestError("'text.format' and 'tools' cannot constrain one reply together: send one", param="text")
    conversation = with_tools(turns, tools) if grammar is not None else turns
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise RequestError("'instructions' must be a string", param="instructions")
        conversation = [{"role": "system", "content": instructions}, *conversation]
    max_tokens = number(body, "max_output_tokens", min(512, limit), 1, limit, int)
    options = {**generation_options({k: body.get(k) for k in SAMPLING}, limit), "max_tokens": max_tokens}
    options.update({"grammar": grammar} if grammar is not None else constraint)
    request = Request(True, conversation, options, [], flag(body, "stream"), tools=grammar is not None)
    echo = {
        "instructions": instructions,
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": previous,
        "store": body.get("store", True) is not False,
        "temperature": options["temp"],
        "text": {"format": text_format},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "top_p": options["top_p"],
        "truncation": "disabled",
        "user": body.get("user"),
    }
    return ResponseRequest(request, turns, echo["store"], echo)


def input_turns(items, image_dirs: tuple[Path, ...]) -> list[dict]:
    """The request's input → our turns: a string is a user message; items are messages (text and images),
    function calls (as the model writes them) and function call outputs (text turns named by their call)."""
    if isinstance(items, str) and items:
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise RequestError("'input' must be a non-empty string or a non-empty list of items", param="input")
    out: list[dict] = []
    names: dict[str, str] = {}  # call_id → the function's name
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        where = f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise RequestError(f"{where}: a message's role is user, assistant, system or developer", param="input")
            content = message_content(item.get("content"), where, image_dirs)
            append_turn(out, "system" if role == "developer" else role, content)
        elif kind == "function_call":
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise RequestError(f"{where}: a function_call needs its 'name'", param="input")
            names[str(item.get("call_id"))] = name
            append_turn(out, "assistant", "[" + call_text(name, json_arguments(item.get("arguments"), "input")) + "]")
        elif kind == "function_call_output":
            name = names.get(str(item.get("call_id"))) or str(item.get("name") or "tool")
            output = output_text(item.get("output"), where)
            append_turn(out, "user", tool_results_text([ToolCall(name, {})], [output]))
        else:
            raise RequestError(
                f"{where}: items are messages, function_call and function_call_output, got {kind!r}", param="input"
            )
    return out


def message_content(content, where: str, image_dirs: tuple[Path, ...]):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}: content must be a string or a list of parts", param="input")
    items = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            items.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and part.get("image_url") is not None:
            items.append({"type": "image", "image": image_source(part["image_url"], where, image_dirs, "input")})
        else:
            raise RequestError(
                f"{where}: content parts are input_text, output_text and input_image (with an image_url), got {kind!r}",
                param="input",
            )
    if all(item["type"] == "text" for item in items):
        return "\n".join(item["text"] for item in items)
    return items


def output_text(output, where: str) -> str:
    if isinstance(output, list) and all(isinstance(p, dict) and p.get("type") == "input_text" for p in output):
        return "\n".join(str(p.get("text", "")) for p in output)
    if not isinstance(output, str):
        raise RequestError(f"{where}: a function_call_output's output must be a string", param="input")
    return output


def function_tools(tools, choice, parallel) -> tuple[list, str | None]:
    """The function tools and the grammar of the reply under `tool_choice`; (…, None) when the reply calls none."""
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RequestError("'tools' must be a list of objects", param="tools")
    known = []
    for i, tool in enumerate(tools or []):
        if tool.get("type") != "function":
            raise RequestError(f"tools[{i}]: only function tools are served here", param="tools")
        try:
            known.append(as_tool({k: v for k, v in tool.items() if k != "type"}))
        except Gemma3Error as e:
            raise RequestError(f"tools[{i}]: {e}", param="tools") from None
    named = choice.get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if choice not in (None, "auto", "none", "required") and not isinstance(named, str):
        raise RequestError(
            '\'tool_choice\' must be "auto", "none", "required" or {"type": "function", "name": ...}',
            param="tool_choice",
        )
    if not known or choice == "none":
        if choice not in (None, "none"):
            raise RequestError("'tool_choice' asks for a call but the request has no 'tools'", param="tool_choice")
        return known, None
    mode = "auto" if choice in (None, "auto") else "required"
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestError("'parallel_tool_calls' must be true or false", param="parallel_tool_calls")
    return known, call_grammar(known, mode, named, parallel is not False)


def format_constraint(text) -> tuple[dict, dict]:
    """(text.format as the response repeats it, the options that hold the reply to it)."""
    if text is None:
        return {"type": "text"}, {}
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise RequestError("'text' must be an object with 'format' (and 'verbosity')", param="text")
    spec = text.get("format") or {"type": "text"}
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return spec, {}
    if kind == "json_object":
        return spec, {"json_schema": {"type": "object"}}
    if kind == "json_schema" and isinstance(spec.get("schema"), dict) and isinstance(spec.get("name"), str):
        return spec, {"json_schema": checked_schema(spec["schema"], "text")}
    raise RequestError(
        '\'text.format\' must be {"type": "text"}, {"type": "json_object"} or '
        '{"type": "json_schema", "name": ..., "schema": {...}}',
        param="text",
    )


class ResponseReply:
    """One response's ids, the fields it repeats, its output items and, once it ends, its storing."""

    def __init__(self, parsed: ResponseRequest, model_id: str, store: ResponseStore):
        self.parsed, self.model_id, self.store = parsed, model_id, store
        self.key = uuid.uuid4().hex[:24]
        self.id, self.created_at = f"resp_{self.key}", int(time.time())

    def body(self, status: str, output: list[dict], usage: dict | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": int(time.time()) if status != "in_progress" else None,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "model": self.model_id,
            "output": output,
            "usage": usage,
            **self.parsed.echo,
        }

    def message_item(self, text: str, status: str) -> dict:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {
            "id": f"msg_{self.key}",
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [part] if status != "in_progress" else [],
        }

    def call_item(self, i: int, call: ToolCall, arguments: str, status: str) -> dict:
        return {
            "id": f"fc_{self.key}_{i}",
            "type": "function_call",
            "call_id": f"call_{self.key}_{i}",
            "name": call.name,
            "arguments": arguments,
            "status": status,
        }

    def output(self, ending: Ending) -> list[dict]:
        status = item_status(ending)
        items = [self.message_item(ending.text, status)] if ending.text or not ending.calls else []
        return items + [self.call_item(i, c, arguments_json(c), "completed") for i, c in enumerate(ending.calls)]

    def finish(self, ending: Ending) -> dict:
        """The whole response, stored (when the request allows) with its conversation for a later request."""
        body = self.body(response_status(ending), self.output(ending), usage_json(ending))
        if self.parsed.store:
            turns = [*self.parsed.turns, {"role": "assistant", "content": ending.raw}]
            self.store.put(self.id, Stored(body, turns))
        return body


def response_status(ending: Ending) -> str:
    return "incomplete" if ending.reason == "length" and not ending.calls else "completed"


def item_status(ending: Ending) -> str:
    return "incomplete" if response_status(ending) == "incomplete" else "completed"


def arguments_json(call: ToolCall) -> str:
    return json.dumps(call.arguments, ensure_ascii=False)


def usage_json(ending: Ending) -> dict:
    usage = ending.usage
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class ResponseStream:
    """A response as the API's events: response.created and response.in_progress; per output item
    output_item.added, its content (content_part.added, output_text.delta…, output_text.done, content_part.done;
    or function_call_arguments.delta and .done), output_item.done; then response.completed (or .incomplete)."""

    def __init__(self, reply: ResponseReply):
        self.reply, self.sequence = reply, 0

    def frames(self, events):
        reply = self.reply
        yield self.event("response.created", response=reply.body("in_progress", []))
        yield self.event("response.in_progress", response=reply.body("in_progress", []))
        text, opened, index = "", False, 0
        for event in events:
            if isinstance(event, Delta):
                if not opened:
                    yield from self.open_message()
                    opened = True
                text += event.text
                yield self.text_event("response.output_text.delta", delta=event.text, logprobs=[])
                continue
            if not opened and (event.text or not event.calls):
                yield from self.open_message()
                opened = True
            if opened:
                yield from self.close_message(event, text)
                index = 1
            for i, call in enumerate(event.calls):
                yield from self.call_events(index + i, i, call)
            body = reply.finish(event)
            kind = "response.completed" if body["status"] == "completed" else "response.incomplete"
            yield self.event(kind, response=body)

    def open_message(self):
        item = self.reply.message_item("", "in_progress")
        yield self.event("response.output_item.added", output_index=0, item=item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield self.text_event("response.content_part.added", part=part)

    def close_message(self, ending: Ending, text: str):
        item = self.reply.message_item(text, item_status(ending))
        yield self.text_event("response.output_text.done", text=text, logprobs=[])
        yield self.text_event("response.content_part.done", part=item["content"][0])
        yield self.event("response.output_item.done", output_index=0, item=item)

    def call_events(self, output_index: int, i: int, call: ToolCall):
        reply, arguments = self.reply, arguments_json(call)
        yield self.event(
            "response.output_item.added", output_index=output_index, item=reply.call_item(i, call, "", "in_progress")
        )
        item = reply.call_item(i, call, arguments, "completed")
        place = {"item_id": item["id"], "output_index": output_index}
        yield self.event("response.function_call_arguments.delta", **place, delta=arguments)
        yield self.event("response.function_call_arguments.done", **place, name=call.name, arguments=arguments)
        yield self.event("response.output_item.done", output_index=output_index, item=item)

    def text_event(self, kind: str, **fields) -> bytes:
        return self.event(kind, item_id=f"msg_{self.reply.key}", output_index=0, content_index=0, **fields)

    def event(self, kind: str, **fields) -> bytes:
        self.sequence += 1
        return sse({"type": kind, "sequence_number": self.sequence - 1, **fields}, kind)

    def error(self, error: RequestError) -> bytes:
        detail = openai_error(error)["error"]
        failed = {**self.reply.body("failed", []), "error": {"code": "server_error", "message": str(error)}}
        return self.event("error", code=detail["code"], message=str(error), param=detail["param"]) + self.event(
            "response.failed", response=failed
        )

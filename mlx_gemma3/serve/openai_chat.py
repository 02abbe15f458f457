"""POST /v1/chat/completions and /v1/completions: OpenAI's chat and text completion replies, whole or streamed.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import json
import time
import uuid

from .reply import Delta, Ending, sse
from .requests import Request, RequestError, openai_error, parse_chat, parse_completion

CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
FINISH_REASONS = {"stop_string": "stop"}  # the engine's reasons are OpenAI's own, but for this one


def chat(exchange) -> None:
    state = exchange.state
    body = exchange.read_json()
    served = exchange.served_model(body.get("model"))
    request = parse_chat(body, state.max_tokens_limit, state.image_dirs, served.processor.tool_style)
    template_kwargs = {**state.chat_template_args, **(request.options.get("chat_template_kwargs") or {})}
    request.options["chat_template_kwargs"] = template_kwargs or None
    answer(exchange, request, served)


def completion(exchange) -> None:
    body = exchange.read_json()
    request = parse_completion(body, exchange.state.max_tokens_limit)
    answer(exchange, request, exchange.served_model(body.get("model")))


def answer(exchange, request: Request, served) -> None:
    events = exchange.generate(served, request)
    reply_id = f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if request.stream:
        exchange.send_stream(ChunkStream(request, reply_id, served.name), events)
    else:
        *_, ending = events
        exchange.send_json(
            200, (chat_body if request.chat else completion_body)(reply_id, served.name, ending, request)
        )


def finish_reason(ending: Ending) -> str:
    return FINISH_REASONS.get(ending.reason, ending.reason)


def usage_json(ending: Ending) -> dict:
    usage = ending.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def tool_calls_json(calls) -> list[dict]:
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:12]}",
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        for c in calls
    ]


def logprobs_json(entries: list | None) -> dict | None:
    return None if entries is None else {"content": entries, "refusal": None}


def chat_body(reply_id: str, model_id: str, ending: Ending, request: Request) -> dict:
    message = {"role": "assistant", "content": (ending.text or None) if ending.calls else ending.text}
    if ending.calls:
        message["tool_calls"] = tool_calls_json(ending.calls)
    choice = {
        "index": 0,
        "message": message,
        "finish_reason": finish_reason(ending),
        "logprobs": logprobs_json(ending.logprobs if request.logprobs else None),
    }
    return {
        "id": reply_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [choice],
        "usage": usage_json(ending),
    }


def completion_body(reply_id: str, model_id: str, ending: Ending, request: Request) -> dict:
    choice = {"index": 0, "text": ending.text, "finish_reason": finish_reason(ending), "logprobs": None}
    return {
        "id": reply_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [choice],
        "usage": usage_json(ending),
    }


class ChunkStream:
    """A reply as OpenAI's stream of chunks: text deltas (tool calls as one tool_calls delta), a last chunk with the
    finish reason, the usage chunk when asked, then [DONE]."""

    def __init__(self, request: Request, reply_id: str, model_id: str):
        self.request, self.reply_id, self.model_id = request, reply_id, model_id
        self.kind = "chat.completion.chunk" if request.chat else "text_completion"

    def frames(self, events):
        request = self.request
        if request.chat:
            yield self.chunk({"role": "assistant", "content": ""})
        for event in events:
            if isinstance(event, Delta):
                delta = {"content": event.text} if request.chat else event.text
                yield self.chunk(delta, None, event.logprobs if request.logprobs else None)
                continue
            ending = event
            if ending.calls:
                deltas = [{"index": i, **call} for i, call in enumerate(tool_calls_json(ending.calls))]
                yield self.chunk({"tool_calls": deltas})
            yield self.chunk({} if request.chat else "", finish_reason(ending))
        if request.include_usage:
            yield sse({**self.head(), "choices": [], "usage": usage_json(ending)})
        yield sse("[DONE]")

    def head(self) -> dict:
        return {"id": self.reply_id, "object": self.kind, "created": int(time.time()), "model": self.model_id}

    def chunk(self, delta, finish: str | None = None, logprobs: list | None = None) -> bytes:
        if self.request.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs_json(logprobs)}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        body = {**self.head(), "choices": [choice]}
        return sse({**body, "usage": None} if self.request.include_usage else body)

    def error(self, error: RequestError) -> bytes:
        return sse(openai_error(error))

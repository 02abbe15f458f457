"""Prompts: a folder's own chat template (Jinja), Gemma 3's built-in chat format, or plain completion."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import Gemma3Error
from .function_gemma import is_function_gemma
from .tokenizer import BOS_ID
from .tools import as_tool, with_tools

__all__ = ["is_base_model"]

ROLES = {"user": "user", "assistant": "model", "model": "model"}
# What one render of a chat template may build: range() items over all its loops, the length a `*` makes, an
# integer argument to a call (str.ljust, ...). Far above any real chat; it keeps a hostile or broken template
# from filling memory or looping for hours.
TEMPLATE_BUDGET = 1_000_000
IMAGE_MARK = "<start_of_image>"
SYSTEM_WITHOUT_CHAT = (
    "a system prompt needs the chat format, and use_chat_template=False (--no-chat-template) completes plain text: "
    "drop one of the two"
)
# What a template renders from a conversation with tool calls (FunctionGemma): turns of these roles, in any order.
TOOL_TURN_ROLES = (*ROLES, "system", "developer", "tool")
# TranslateGemma's content items carry the language pair; chat_template_kwargs may give it for every user turn.
LANGUAGE_KEYS = ("source_lang_code", "target_lang_code")
# Names a template renders from the call itself; chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_NAMES = ("messages", "add_generation_prompt", "tools", "documents", "bos_token", "eos_token")


def find_chat_template(folder: str | Path) -> str | None:
    """The chat template a model folder ships: chat_template.jinja, chat_template.json or tokenizer_config.json."""
    folder = Path(folder)
    path = folder / "chat_template.jinja"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise Gemma3Error(f"{path} is not UTF-8 text (byte {e.start}): re-save it as UTF-8") from None
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = _json_template(folder / name)
        if template:
            return template
    return None


def is_base_model(processor) -> bool:
    """Whether a loaded model is taken for a base (pre-trained, not instruction-tuned) model: its folder ships
    no chat template (no chat_template.jinja or chat_template.json, and no chat_template in
    tokenizer_config.json). The demo 270M is one, as are Google's `-pt` releases; `-it` folders ship a template."""
    return processor.chat_template is None


def _json_template(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as e:
        raise Gemma3Error(f"{path} is not valid JSON ({e})") from None
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def check_messages(messages, tool_turns: bool = False) -> list[dict]:
    """Messages as the chat format needs them: dicts with a known role; an optional system message first;
    then user and model turns alternating, starting with the user. `tool_turns`: for a template that renders tool
    calls and their results (FunctionGemma), turns of any of TOOL_TURN_ROLES in any order, an assistant turn
    with tool_calls needing no content; the template checks the rest."""
    if not isinstance(messages, list) or not messages:
        raise Gemma3Error("a chat prompt must be a non-empty list of {'role': ..., 'content': ...} messages")
    if tool_turns:
        return check_tool_turns(messages)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise Gemma3Error(f"message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in (*ROLES, "system") or (message["role"] == "system" and i > 0):
            raise Gemma3Error(
                f"message {i} has role {message['role']!r}: use 'user' or 'assistant'/'model' "
                "(a 'system' message may only come first)"
            )
        content_text(message["content"])
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "model"
        if ROLES[message["role"]] != expected:
            raise Gemma3Error(
                f"chat roles must alternate user/model starting with user: turn {i + 1} is {message['role']!r}, "
                f"expected {'user' if expected == 'user' else 'assistant'}"
            )
    return messages


def check_tool_turns(messages: list) -> list[dict]:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in TOOL_TURN_ROLES:
            raise Gemma3Error(
                f"message {i} must be a dict whose 'role' is one of {', '.join(TOOL_TURN_ROLES)}, got {message!r:.80}"
            )
        if "content" not in message and not message.get("tool_calls"):
            raise Gemma3Error(f"message {i} needs 'content' (or, from the assistant, 'tool_calls')")
    return messages


def content_text(content) -> str:
    """A message's content as prompt text: strings as they are, image items as <start_of_image>."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Gemma3Error(f"message content must be a string or a list of items, got {type(content).__name__}")
    parts = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            parts.append(str(item.get("text", "")).strip())
        elif kind == "image":
            parts.append(IMAGE_MARK)
        else:
            raise Gemma3Error(
                f"content item {item!r:.80} must be {{'type': 'text', 'text': ...}} or {{'type': 'image'}}"
            )
    return "".join(parts)


def gemma_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Gemma 3's chat format (docs/model.md §7): system folded into the first user turn, roles user/model."""
    messages = check_messages(messages)
    prefix = ""
    if messages[0]["role"] == "system":
        prefix, messages = content_text(messages[0]["content"]) + "\n\n", messages[1:]
    text = "<bos>"
    for i, message in enumerate(messages):
        body = (prefix if i == 0 else "") + content_text(message["content"]).strip()
        text += f"<start_of_turn>{ROLES[message['role']]}\n{body}<end_of_turn>\n"
    return text + ("<start_of_turn>model\n" if add_generation_prompt else "")


def render_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    """Render a Hugging Face chat template the way transformers does (sandboxed Jinja; `tools` and `documents`
    defined, None unless given; `extra` are further template variables)."""
    from jinja2 import TemplateError

    def raise_exception(message):
        raise Gemma3Error(f"the model's chat template refused the messages: {message}")

    env = _bounded_sandbox()
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        text = env.from_string(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token="<bos>",
            eos_token="<eos>",
            **{"tools": None, "documents": None, **extra},
        )
    except (TemplateError, OverflowError) as e:
        raise Gemma3Error(f"the model's chat template failed: {_first_line(e)}") from None
    except RecursionError:
        raise Gemma3Error("the model's chat template failed: it recurses without end") from None
    if not text.strip():
        raise Gemma3Error(
            "the model's chat template rendered nothing for these messages: fix the template or run without it"
        )
    return text


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _bounded_sandbox():
    """Jinja's immutable sandbox, bounded by TEMPLATE_BUDGET per render (see there)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    def too_big(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) > TEMPLATE_BUDGET

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])
        ranged = 0

        def call_binop(self, context, operator, left, right):
            sequence, times = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if operator == "*" and isinstance(sequence, (str, list, tuple)) and too_big(len(sequence) * times):
                raise SecurityError(f"a repetition longer than {TEMPLATE_BUDGET}")
            if operator == "**" and too_big(right):
                raise SecurityError(f"a power above {TEMPLATE_BUDGET}")
            return super().call_binop(context, operator, left, right)

        def call(self, context, obj, *args, **kwargs):
            if any(too_big(a) for a in (*args, *kwargs.values())):
                raise SecurityError(f"a call with an argument above {TEMPLATE_BUDGET}")
            return super().call(context, obj, *args, **kwargs)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def bounded_range(*args):
        items = range(*args)
        env.ranged += len(items)
        if env.ranged > TEMPLATE_BUDGET:
            raise SecurityError(f"loops over more than {TEMPLATE_BUDGET} range() items")
        return items

    env.globals["range"] = bounded_range
    return env


def chat_text(
    messages: list[dict],
    template: str | None,
    add_generation_prompt: bool = True,
    tools=None,
    template_kwargs: dict | None = None,
) -> str:
    """Prompt text for a conversation: the folder's template if it has one, else Gemma 3's format.

    `tools` (functions, JSON schemas or Tools): declared by a template that declares them (FunctionGemma's), else
    described at the start of the first user turn, as Google documents for Gemma 3. `template_kwargs`: further
    variables for the template (chat_template_kwargs); TranslateGemma's source_lang_code / target_lang_code among
    them also fill the user turns' content items that lack them."""
    native = is_function_gemma(template)
    check_messages(messages, tool_turns=native)
    if tools and not native:
        messages = with_tools(messages, tools)
    if template is None:
        if template_kwargs:
            raise Gemma3Error("chat template arguments need the model's own chat template, and this folder has none")
        return gemma_chat(messages, add_generation_prompt)
    kwargs = checked_template_kwargs(template_kwargs)
    messages = with_language_codes(messages, template, kwargs)
    schemas = [as_tool(t).template_schema() for t in tools] if native and tools else None
    return render_template(template, messages, add_generation_prompt, tools=schemas, **kwargs)


def checked_template_kwargs(kwargs) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise Gemma3Error("chat template arguments must be a JSON object whose keys are names")
    reserved = [k for k in kwargs if k in RESERVED_TEMPLATE_NAMES]
    if reserved:
        raise Gemma3Error(
            f"chat template argument {reserved[0]!r} is set by the prompt itself; pass it the ordinary way "
            "(messages, tools, ...)"
        )
    return kwargs


def with_language_codes(messages: list[dict], template: str, kwargs: dict) -> list[dict]:
    """The user turns with the language codes of `kwargs` in their content items (a text content becomes one
    text item), when the template reads them from there (TranslateGemma) and `kwargs` gives them."""
    codes = {k: kwargs[k] for k in LANGUAGE_KEYS if k in kwargs}
    if not codes or "source_lang_code" not in template:
        return messages
    out = []
    for message in messages:
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, (str, list)):
            items = [{"type": "text", "text": content}] if isinstance(content, str) else content
            message = {**message, "content": [{**codes, **i} if isinstance(i, dict) else i for i in items]}
        out.append(message)
    return out


def as_messages(prompt: str | list[dict], system: str | None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        if messages and messages[0].get("role") == "system":
            raise Gemma3Error("a system prompt was given twice: as `system` and as the first message")
        messages.insert(0, {"role": "system", "content": system})
    return messages


def as_token_ids(value) -> list[int] | None:
    """`value` as a list of token ids when it is one: a list or tuple of integers, or a 1-D (or [1, N]) integer
    mx.array or numpy array; None when it is something else (text, chat messages, floats, a batch of prompts)."""
    if value is None or isinstance(value, (str, bytes, dict)):
        return None
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1:
        return None
    if array.size and not np.issubdtype(array.dtype, np.integer):
        return None
    return [int(t) for t in array.tolist()]


def prompt_ids(
    processor,
    prompt,
    system: str | None = None,
    use_chat_template: bool = True,
    crops_per_image: list[int] | None = None,
    tokens_per_image: int | None = None,
    tools=None,
    template_kwargs: dict | None = None,
) -> list[int]:
    """Token ids for a prompt: a string, a list of chat messages, or ids already tokenized.

    A string is wrapped as one user turn when the folder ships a chat template (instruction-tuned models)
    and completed as it is otherwise (base models) or with use_chat_template=False. With images
    (`crops_per_image`: one entry per image), each image placeholder expands to its image tokens."""
    ids = None if isinstance(prompt, str) else as_token_ids(prompt)
    if ids:
        return ids
    if not isinstance(prompt, (str, list, tuple)):
        raise Gemma3Error(
            "a prompt is a string, a list of chat messages or a list of token ids (or a 1-D integer mx.array or "
            f"numpy array of them); got {type(prompt).__name__}"
        )
    tokenizer = processor.tokenizer
    if tokenizer is None:
        raise Gemma3Error("this model folder has no tokenizer.model: pass token ids, or add the tokenizer file")
    if isinstance(prompt, str) and not prompt:
        raise Gemma3Error("the prompt is empty: give some text")
    text, add_bos = prompt_text(processor, prompt, system, use_chat_template, tools, template_kwargs)
    if crops_per_image is not None:
        text = expand_image_tokens(text, crops_per_image, tokens_per_image)
    ids = tokenizer.encode(text, add_bos=False)
    return [BOS_ID, *ids] if add_bos and ids[:1] != [BOS_ID] else ids


def prompt_text(
    processor, prompt, system: str | None, use_chat_template: bool, tools=None, template_kwargs: dict | None = None
) -> tuple[str, bool]:
    """(text, whether BOS must be added): plain completion, or the conversation in the chat format.

    A string is completed as it is with use_chat_template=False, and on a base model (no chat template) when no
    system prompt comes with it. A system prompt makes it a conversation: on a base model that conversation is
    written in Gemma 3's own chat format (the system text folded into the first user turn), as chat messages
    always are, so a system prompt means the same in generate, chat, the server and the chat page."""
    if isinstance(prompt, str) and not use_chat_template and system is not None:
        raise Gemma3Error(SYSTEM_WITHOUT_CHAT)
    if isinstance(prompt, str) and (not use_chat_template or (processor.chat_template is None and system is None)):
        if tools or template_kwargs:
            raise Gemma3Error("tools and chat template arguments need the chat format: give a chat prompt")
        return prompt, True
    text = chat_text(as_messages(prompt, system), processor.chat_template, True, tools, template_kwargs)
    return text, not text.startswith("<bos>")


def expand_image_tokens(text: str, crops_per_image: list[int], tokens_per_image: int) -> str:
    """Each <start_of_image> placeholder (IMAGE_MARK) in text, in order, replaced by its image's sequence;
    the text must hold exactly one placeholder per image."""
    parts = text.split(IMAGE_MARK)
    if len(parts) - 1 != len(crops_per_image):
        raise Gemma3Error(
            f"the prompt has {len(parts) - 1} {IMAGE_MARK} placeholder(s) but {len(crops_per_image)} image(s) "
            f"were given: put one {IMAGE_MARK} (or an {{'type': 'image'}} content item) where each image goes"
        )
    if not isinstance(tokens_per_image, int) or tokens_per_image < 1:
        raise Gemma3Error(f"tokens_per_image must be a positive integer, got {tokens_per_image!r}")
    expanded = [parts[0]]
    for crops, part in zip(crops_per_image, parts[1:]):
        expanded += [image_sequence(crops, tokens_per_image), part]
    return "".join(expanded)


def image_sequence(num_crops: int, tokens_per_image: int) -> str:
    """The text one image becomes in the prompt (docs/model.md §7): its soft tokens between BOI and EOI,
    and with pan & scan crops, the original's and each crop's, in Gemma3Processor's wording."""
    from .tokenizer import IMAGE_SOFT_TOKEN

    one = f"\n\n{IMAGE_MARK}{IMAGE_SOFT_TOKEN * tokens_per_image}<end_of_image>\n\n"
    if not num_crops:
        return one
    return f"Here is the original image {one} and here are some crops to help you see better " + " ".join(
        [one] * num_crops
    )

"""Options: everything stream_generate, Chat and the server accept besides the model, processor and prompt, with
each option's type and range checked in one place.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields

from ..errors import Gemma3Error
from ..model.cache import REWIND
from ..model.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, KV_BITS
from ..processing.grammar import grammar_text
from .constrain import Constraint, budget_problem
from .sample import LogitsProcessor, Sampler, logit_bias, repetition_penalty, sampling_problem
from .step import PREFILL_STEP_SIZE, Progress


@dataclass
class Options:
    """Everything stream_generate accepts besides the model, processor and prompt."""

    max_tokens: int | None = 256  # -1 or None: until the reply or the context ends
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    prefill_step_size: int = PREFILL_STEP_SIZE
    prefill_progress: Progress | None = None
    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_GROUP_SIZE
    max_kv_size: int | None = None
    system: str | None = None
    use_chat_template: bool = True
    stop_ids: tuple[int, ...] = ()
    pan_and_scan: bool = False
    prompt_cache_file: str | os.PathLike | None = None
    draft_model: object = None  # a loaded model of the same vocabulary (mlx_gemma3.load): speculative decoding
    num_draft_tokens: int = 3
    prompt_lookup: int = 0  # draft up to this many tokens by copying from the prompt and history (0: off)
    json_schema: object = None  # the reply is JSON valid under this schema (a dict, its JSON text, a pydantic class)
    regex: str | None = None  # the reply matches this regular expression
    grammar: str | None = None  # the reply follows this Lark grammar (llguidance's dialect)
    json_limits: bool = True  # JSON parts of a constraint keep to numbers a parser keeps and bounded whitespace
    tools: list | None = None  # functions the model may call (see processing.prompt.chat_text): chat prompts only
    chat_template_kwargs: dict | None = None  # further variables for the folder's chat template

    @classmethod
    def of(cls, options: dict) -> Options:
        """Checked options from keyword arguments; an unknown name is refused with the list of valid ones."""
        names = [f.name for f in fields(cls)]
        for name in options:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise Gemma3Error(f"unknown option {name!r}{hint}; valid options: {', '.join(names)}")
        opts = cls(**options)
        opts.check()
        return opts

    def check(self) -> None:
        for name, (fits, allowed) in OPTION_RULES.items():
            value = getattr(self, name)
            if not fits(value):
                raise Gemma3Error(f"{name} must be {allowed}, got {value!r:.80}")
        problem = sampling_problem(self.temp, self.top_k, self.top_p, self.min_p)
        if problem:
            raise Gemma3Error(problem)
        if self.draft_model is not None and self.prompt_lookup:
            raise Gemma3Error("draft_model and prompt_lookup are two ways to draft: pass one of them")
        constraints = [name for name in ("json_schema", "regex", "grammar") if getattr(self, name) is not None]
        if len(constraints) > 1:
            raise Gemma3Error(f"pass one constraint at a time, got {' and '.join(constraints)}")

    @property
    def draft_tokens(self) -> int:
        """Tokens drafted per round: 0 without speculative decoding."""
        if self.prompt_lookup:
            return self.prompt_lookup
        return self.num_draft_tokens if self.draft_model is not None else 0

    @property
    def rewind(self) -> int:
        """Tokens a wrapped sliding cache can still forget: enough for a round's rejected drafts."""
        return max(REWIND, self.draft_tokens + 1)

    @property
    def cache_layout(self) -> tuple:
        """What makes two requests' caches interchangeable (kept prompt caches are reused only within one)."""
        return (self.kv_bits, self.kv_group_size, self.max_kv_size, self.rewind)

    def make_cache(self, model) -> list:
        """An empty cache for `model` that can rewind a round's rejected drafts."""
        return model.make_cache(self.kv_bits, self.kv_group_size, self.max_kv_size, self.rewind)

    @property
    def unlimited(self) -> bool:
        return self.max_tokens in UNLIMITED

    def token_budget(self, room: int) -> int | None:
        """Most tokens to generate: max_tokens within the `room` the context leaves; no limit means all that room
        (or, with a rotating max_kv_size cache, which has no end, until the reply ends)."""
        if self.max_kv_size is not None:
            return None if self.unlimited else self.max_tokens
        return room if self.unlimited else min(self.max_tokens, room)

    def processors(self) -> list[LogitsProcessor]:
        """The caller's logits processors, then the repetition penalty and the logit bias."""
        processors = list(self.logits_processors)
        if self.repetition_penalty is not None:
            penalty = self.repetition_penalty
            processors.append(lambda seen, logits: repetition_penalty(logits, seen[None], penalty))
        if self.logit_bias:
            bias = self.logit_bias
            processors.append(lambda seen, logits: logit_bias(logits, bias))
        return processors

    def reply_processors(
        self, processor, max_tokens: int | None = None
    ) -> tuple[list[LogitsProcessor], Constraint | None]:
        """One reply's logits processors (`processors()`, then its constraint last) and that constraint (or None);
        `max_tokens`: the reply's budget, which the constraint closes the reply within."""
        constraint = self.constraint(processor, max_tokens)
        return [*self.processors(), *([constraint] if constraint is not None else [])], constraint

    def constraint(self, processor, max_tokens: int | None = None) -> Constraint | None:
        """A new Constraint (one per reply) for json_schema, regex or grammar; None when none is set."""
        text = grammar_text(self.json_schema, self.regex, self.grammar)
        return None if text is None else Constraint(processor, text, max_tokens, self.json_limits)

    def budget_problem(self, processor, max_tokens: int) -> str | None:
        """Why no reply the constraint allows fits in `max_tokens` tokens; None when one does, or there is none."""
        text = grammar_text(self.json_schema, self.regex, self.grammar)
        return None if text is None else budget_problem(processor, text, max_tokens, self.json_limits)

    def sampler(self) -> Sampler:
        return Sampler(self.temp, self.top_k, self.top_p, self.min_p, self.seed)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


UNLIMITED = (-1, None)  # max_tokens values that mean: until the reply or the context ends
# Each option's type and range (the sampling ranges are sample.sampling_problem's): (fits, what is allowed).
OPTION_RULES = {
    "max_tokens": (
        lambda v: v in UNLIMITED or _integer(v) and v >= 1,
        "a positive integer, or -1 / None for no limit (until the reply or the context ends)",
    ),
    "temp": (_number, "a number (0 is greedy)"),
    "top_p": (_number, "a number in (0, 1]"),
    "top_k": (_integer, "an integer (0 is off)"),
    "min_p": (_number, "a number in [0, 1]"),
    "seed": (lambda v: v is None or _integer(v), "an integer or None"),
    "repetition_penalty": (lambda v: v is None or _number(v) and v > 0, "a positive number (1 is off) or None"),
    "logit_bias": (
        lambda v: v is None or isinstance(v, dict) and all(_integer(k) and _number(b) for k, b in v.items()),
        "a dict {token id: bias} or None",
    ),
    "logits_processors": (
        lambda v: isinstance(v, (list, tuple)) and all(map(callable, v)),
        "a list of callables (tokens, logits) -> logits",
    ),
    "prefill_step_size": (lambda v: _integer(v) and v >= 1, "a positive integer (prompt tokens per forward)"),
    "prefill_progress": (lambda v: v is None or callable(v), "a callable (done, total) or None"),
    "kv_bits": (lambda v: v is None or v in KV_BITS, f"None or one of {KV_BITS}"),
    "kv_group_size": (lambda v: v in GROUP_SIZES, f"one of {GROUP_SIZES}"),
    "max_kv_size": (lambda v: v is None or _integer(v) and v >= 1, "a positive number of tokens or None"),
    "system": (lambda v: v is None or isinstance(v, str), "a string or None"),
    "use_chat_template": (lambda v: isinstance(v, bool), "True or False"),
    "stop_ids": (lambda v: isinstance(v, (list, tuple, set)) and all(map(_integer, v)), "a list of token ids"),
    "pan_and_scan": (lambda v: isinstance(v, bool), "True or False"),
    "prompt_cache_file": (lambda v: v is None or isinstance(v, (str, os.PathLike)), "a file path or None"),
    "draft_model": (
        lambda v: v is None or hasattr(v, "make_cache") and hasattr(v, "config"),
        "a model from mlx_gemma3.load() or None",
    ),
    "num_draft_tokens": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "prompt_lookup": (lambda v: _integer(v) and v >= 0, "a number of tokens to draft (0 is off)"),
    "json_schema": (
        lambda v: v is None or isinstance(v, (dict, str)) or hasattr(v, "model_json_schema"),
        "a JSON schema (a dict or its JSON text), a pydantic model class, or None",
    ),
    "regex": (lambda v: v is None or isinstance(v, str) and v != "", "a regular expression or None"),
    "grammar": (lambda v: v is None or isinstance(v, str) and v != "", "a Lark grammar (text) or None"),
    "json_limits": (lambda v: isinstance(v, bool), "True or False"),
    "tools": (
        lambda v: v is None or isinstance(v, (list, tuple)),
        "a list of tools (functions, JSON schemas) or None",
    ),
    "chat_template_kwargs": (lambda v: v is None or isinstance(v, dict), "a dict of template variables or None"),
}

"""Structured output on the 270M: how often replies validate with and without the constraint, and the mask's cost.

    python benchmarks/structured.py [--model MODEL] [--samples 20] [--max-tokens 48] [--json results/structured.json]

Tool calls: 20 questions, greedy, with tool_choice "required"'s grammar and without. For each schema of
tests/data/structured_270m.json, --samples replies (sampled at temperature 0.8, seeds 0…N-1)
with the constraint and as many without: a reply counts when it parses as JSON and validates with jsonschema.
The mask's cost is the CPU time of each step's constraint work (bringing the matcher to the new token, computing
and unpacking the mask), timed inside one constrained run, against the mean decode step of an unconstrained run
of the same length, both in this process. An unconstrained reply is cut short once its first visible character
shows it cannot be JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jsonschema
import mlx.core as mx

import mlx_gemma3
from mlx_gemma3.generation.constrain import Constraint
from mlx_gemma3.model.sources import model_folder
from mlx_gemma3.processing.grammar import grammar_text
from mlx_gemma3.processing.tools import parse_tool_calls, tool_call_grammar, tools_prompt

CASES = Path(__file__).parent.parent / "tests" / "data" / "structured_270m.json"
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
JSON_STARTS = '{["-0123456789tfn'  # the characters a JSON text can start with
CITIES = [
    "Oslo",
    "Lima",
    "Paris",
    "Tokyo",
    "Cairo",
    "Seoul",
    "Quito",
    "Rome",
    "Delhi",
    "Accra",
    "Hanoi",
    "Bern",
    "Dakar",
    "Doha",
    "Kyiv",
    "Riga",
    "Sofia",
    "Oslo",
    "Perth",
    "Austin",
]


class TimedConstraint(Constraint):
    """A Constraint that records the CPU time of its own work per step (not the wait for the previous token)."""

    def __init__(self, tokenizer, grammar: str):
        super().__init__(tokenizer, grammar)
        self.seconds: list[float] = []

    def __call__(self, tokens, logits):
        mx.eval(tokens)  # the previous step's token: waiting for it is the decode's time, not the mask's
        tic = time.perf_counter()
        self.follow(tokens)
        allowed = mx.array(self.allowed(logits.shape[-1]))
        self.seconds.append(time.perf_counter() - tic)
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def reply(model, processor, prompt: str, **options) -> str:
    """The reply, cut short once its first visible character shows it cannot be JSON (it would not count anyway)."""
    text = ""
    for response in mlx_gemma3.stream_generate(model, processor, prompt, **options):
        text += response.text
        if text.strip() and text.strip()[0] not in JSON_STARTS:
            break
    return text


def rates(model, processor, cases: list[dict], samples: int, max_tokens: int) -> dict:
    counts = {"constrained": 0, "unconstrained": 0}
    for case in cases:
        for seed in range(samples):
            for name, extra in (("constrained", {"json_schema": case["schema"]}), ("unconstrained", {})):
                text = reply(model, processor, case["prompt"], max_tokens=max_tokens, temp=0.8, seed=seed, **extra)
                counts[name] += valid(text.strip(), case["schema"])
    total = samples * len(cases)
    return {name: {"valid": count, "of": total, "rate": count / total} for name, count in counts.items()}


def tool_call_rates(model, processor, max_tokens: int) -> dict:
    """Replies to "What is the weather in CITY?" (greedy) that are calls whose arguments validate, with
    tool_choice "required"'s grammar and without it."""
    grammar = tool_call_grammar([WEATHER], "python", "required")
    counts = {"constrained": 0, "unconstrained": 0}
    for city in CITIES:
        prompt = tools_prompt([WEATHER]) + f"\nWhat is the weather in {city}?\n"
        for name, extra in (("constrained", {"grammar": grammar}), ("unconstrained", {})):
            calls = parse_tool_calls(mlx_gemma3.generate(model, processor, prompt, max_tokens=max_tokens, **extra))
            counts[name] += bool(calls) and all(
                call.name == WEATHER["name"] and valid_arguments(call.arguments) for call in calls
            )
    return {name: {"valid": count, "of": len(CITIES)} for name, count in counts.items()}


def valid_arguments(arguments: dict) -> bool:
    try:
        jsonschema.validate(arguments, WEATHER["parameters"])
    except jsonschema.ValidationError:
        return False
    return True


def mask_cost(model, processor, case: dict, tokens: int) -> dict:
    """Mean constraint CPU time per step against the mean unconstrained decode step (same prompt, same length)."""
    constraint = TimedConstraint(processor, grammar_text(json_schema=case["schema"]))
    list(
        mlx_gemma3.stream_generate(model, processor, case["prompt"], max_tokens=tokens, logits_processors=[constraint])
    )
    plain = list(mlx_gemma3.stream_generate(model, processor, case["prompt"], max_tokens=tokens))
    step = 1 / plain[-1].generation_tps
    mask = statistics.mean(constraint.seconds[1:])  # the first call only records where the reply starts
    return {"mask_ms": 1e3 * mask, "step_ms": 1e3 * step, "share": mask / step, "steps": len(constraint.seconds)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the demo 270M")
    parser.add_argument("--samples", type=int, default=20, help="replies per schema, each way")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--cost-tokens", type=int, default=32, help="tokens per run when timing the mask")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model, processor = mlx_gemma3.load(model_folder(args.model) if args.model else mlx_gemma3.demo_model())
    cases = json.loads(CASES.read_text())
    tic = time.perf_counter()
    _ = processor.grammar_tokenizer  # built once, timed
    build = time.perf_counter() - tic
    unbounded = {
        "prompt": "A long description, as JSON:",
        "schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    }
    cost = {
        name: mask_cost(model, processor, case, args.cost_tokens)
        for name, case in (("nested object (order)", cases[-1]), ("free string", unbounded))
    }
    results = {"tokenizer_build_s": build, "mask_cost": cost}
    print(json.dumps(results, indent=2), flush=True)
    results["rates"] = rates(model, processor, cases, args.samples, args.max_tokens)
    results["samples"] = args.samples
    print(json.dumps(results["rates"], indent=2), flush=True)
    results["tool_calls"] = tool_call_rates(model, processor, args.max_tokens)
    print(json.dumps(results["tool_calls"], indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

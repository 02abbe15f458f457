"""Structured output on the 270M: valid replies within a token budget, with and without budget-aware closing, and
what the constraint costs per step.

    python benchmarks/structured.py [--model MODEL] [--samples 2] [--json results/structured-270m.json]

For each schema of tests/data/structured_270m.json and three budgets (tight: its hand-written shortest valid
instance plus 3 tokens; normal: twice that instance; generous: 128 tokens), --samples replies sampled at
temperature 1.0 (seeds 0…N-1) with budget-aware closing (the library's default) and as many without it (the same
grammar and JSON limits, max_tokens not given to the constraint): a reply counts when it parses as JSON and
validates with jsonschema; its length is in tokens. Until the budget is watched both ways give the same reply for
a seed, so a reply that ended before then stands for both.

The constraint's cost is the CPU time of its own work per step (bringing its matchers to the new token, both masks,
the finish search and, once the budget is watched, the candidates weighed), timed after the forward has finished
so that none of it overlaps, against the mean decode step of an unconstrained run of the same length in this
process: while the budget is free (generous) and while it is watched from the first token (tight). On a Mac the
decode step is far shorter than on this CPU and the constraint's work overlaps the forward except where the budget
is watched; the CPU share says what the constraint costs here, not what it costs there.

Tool calls: 20 questions, greedy, with tool_choice "required"'s grammar and without.
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
GENEROUS = 128
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
    """A Constraint that records the CPU time of its own work per step (after the forward, so none overlaps it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds: list[float] = []

    def __call__(self, tokens, logits):
        mx.eval(tokens, logits)  # the forward's time is the decode step's, not the constraint's
        tic = time.perf_counter()
        masked = super().__call__(tokens, logits)
        self.seconds.append(time.perf_counter() - tic)
        return masked


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def budgets(processor, case: dict) -> dict[str, int]:
    shortest = len(processor.tokenizer.encode(case["shortest"], add_bos=False))
    return {"tight": shortest + 3, "normal": 2 * shortest, "generous": GENEROUS}


def reply(model, processor, case: dict, budget: int, closing: bool, seed: int) -> tuple[bool, int, bool]:
    """(valid, length in tokens, whether the budget was watched) of one sampled reply; without closing the
    constraint is not told the budget."""
    text = grammar_text(json_schema=case["schema"])
    constraint = Constraint(processor, text, budget if closing else None)
    out = list(
        mlx_gemma3.stream_generate(
            model, processor, case["prompt"], max_tokens=budget, temp=1.0, seed=seed, logits_processors=[constraint]
        )
    )
    return valid("".join(o.text for o in out), case["schema"]), len(out), constraint.watched


def rates(model, processor, cases: list[dict], samples: int) -> list[dict]:
    """Per schema and budget: each sample with closing and without. Until the budget is watched both ways mask
    alike and sample alike (the same seed), so a reply that ended before it was watched is its own unclosed twin
    and is not run again."""
    rows = []
    for case in cases:
        row = {"prompt": case["prompt"], "budgets": budgets(processor, case)}
        for name, budget in row["budgets"].items():
            runs = {"closing": [], "no_closing": []}
            for seed in range(samples):
                ok, length, watched = reply(model, processor, case, budget, True, seed)
                runs["closing"].append((ok, length))
                runs["no_closing"].append(
                    reply(model, processor, case, budget, False, seed)[:2] if watched else (ok, length)
                )
            for way, results in runs.items():
                row[f"{name}_{way}"] = {
                    "valid": sum(ok for ok, _ in results) / samples,
                    "mean_tokens": statistics.mean(length for _, length in results),
                }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict:
    keys = [key for key in rows[0] if key not in ("prompt", "budgets")]
    return {
        key: {
            "valid": statistics.mean(row[key]["valid"] for row in rows),
            "mean_tokens": statistics.mean(row[key]["mean_tokens"] for row in rows),
        }
        for key in keys
    }


def mask_cost(model, processor, case: dict, budget: int) -> dict:
    """Mean constraint CPU time per step against the mean unconstrained decode step (same prompt, same length)."""
    constraint = TimedConstraint(processor, grammar_text(json_schema=case["schema"]), budget)
    out = list(
        mlx_gemma3.stream_generate(
            model, processor, case["prompt"], max_tokens=budget, logits_processors=[constraint], temp=1.0, seed=0
        )
    )
    plain = list(mlx_gemma3.stream_generate(model, processor, case["prompt"], max_tokens=len(out)))
    step = 1 / plain[-1].generation_tps
    mask = statistics.mean(constraint.seconds[1:])  # the first call also records where the reply starts
    return {"mask_ms": 1e3 * mask, "step_ms": 1e3 * step, "share": mask / step, "steps": len(constraint.seconds)}


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the demo 270M")
    parser.add_argument("--samples", type=int, default=2, help="replies per schema, budget and way")
    parser.add_argument("--schemas", type=int, default=20, help="the first N schemas of the data file (quick runs)")
    parser.add_argument("--tool-tokens", type=int, default=48, help="max_tokens of the tool-call replies")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model, processor = mlx_gemma3.load(model_folder(args.model) if args.model else mlx_gemma3.demo_model())
    cases = json.loads(CASES.read_text())[: args.schemas]
    tic = time.perf_counter()
    _ = processor.grammar_tokenizer  # built once, timed
    results = {"tokenizer_build_s": time.perf_counter() - tic, "samples": args.samples, "temperature": 1.0}
    order = json.loads(CASES.read_text())[-1]  # the nested order: the longest finish of the 20
    results["mask_cost"] = {
        "budget free (generous)": mask_cost(model, processor, order, GENEROUS),
        "budget watched (tight)": mask_cost(model, processor, order, budgets(processor, order)["tight"]),
    }
    print(json.dumps(results, indent=2), flush=True)
    results["per_schema"] = rates(model, processor, cases, args.samples)
    results["summary"] = summary(results["per_schema"])
    print(json.dumps(results["summary"], indent=2), flush=True)
    results["tool_calls"] = tool_call_rates(model, processor, args.tool_tokens)
    print(json.dumps(results["tool_calls"], indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

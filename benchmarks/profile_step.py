"""One decode step of mlx_gemma3 against its floor: the step's matmuls (and the output head) timed alone.

    python benchmarks/profile_step.py --model FOLDER [--model FOLDER2 ...] [--contexts 64,512] [--steps 8]
        [--mlx-lm-model FOLDER ...] [--json results/profile.json]

For each model and context length the caches are filled synthetically (random keys and values written with
update_and_fetch in big chunks: the step's cost does not depend on their values), then:
- step (sync): `model(token, cache)` then `mx.eval(logits)`, median of --steps; split into graph building
  (Python, before eval) and evaluation;
- step (pipelined): the per-token time of mlx_gemma3's own generation loop (sampling included, the next
  step queued with async_eval while the current token is handed out);
- floor: every matmul of the step run alone at its decode shape with the same weights and kernels (float
  or quantized), each kind's layers evaluated together, median of repeats: the projections (q, k, v, o,
  gate, up, down in each layer) at [1, 1, in], the tied output head, and attention's two products
  (q·kᵀ and weights·v, over as many keys as each layer's cache holds for the next token);
- the other pieces at the same shapes: attention (SDPA over the keys each layer really attends to), the
  RMSNorms, RoPE, cache writes, masks, embedding, argmax sampling.
Overhead = (step − floor) ÷ step; the table also gives it against the projections and head alone. With --mlx-lm-model, mlx-lm's step on the same weights, filled the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma3.train.adapters import DEFAULT_KEYS as PROJECTIONS

HERE = Path(__file__).resolve().parent
CHUNK = 4096
REPEATS = 15


def timed(fn, repeats: int = REPEATS, warmup: int = 2) -> float:
    """Median seconds of fn() (which must evaluate what it builds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def fill(caches, context: int, kv_heads: int, head_dim: int, dtype) -> None:
    """Write `context` random keys and values into every layer's cache, CHUNK tokens at a time."""
    done = 0
    while done < context:
        n = min(CHUNK, context - done)
        for cache in caches:
            k = mx.random.normal((1, kv_heads, n, head_dim)).astype(dtype)
            v = mx.random.normal((1, kv_heads, n, head_dim)).astype(dtype)
            cache.update_and_fetch(k, v)
            mx.eval([a for a in _state(cache) if a is not None])
        done += n


def _state(cache):
    keys = getattr(cache, "keys", None)
    values = getattr(cache, "values", None)
    flat = []
    for part in (keys, values):
        flat.extend(part if isinstance(part, (tuple, list)) else [part])
    return flat


def step_times(model, cache, steps: int) -> dict:
    """Synchronous decode steps: graph-building and evaluation seconds (medians)."""
    token = mx.array([[1234]])
    builds, evals, totals = [], [], []
    for i in range(steps + 2):
        tic = time.perf_counter()
        logits = model(token, cache=cache)[0, -1]
        built = time.perf_counter()
        mx.eval(logits)
        done = time.perf_counter()
        if i >= 2:
            builds.append(built - tic)
            evals.append(done - built)
            totals.append(done - tic)
    return {
        "step_s": statistics.median(totals),
        "build_s": statistics.median(builds),
        "eval_s": statistics.median(evals),
    }


def pipelined_time(model, cache, steps: int) -> float:
    """Per-token seconds in mlx_gemma3's generation loop (greedy), starting from the filled cache."""
    from mlx_gemma3 import generate_step

    stamps = []
    for _ in generate_step(model, [1234], cache, max_tokens=steps + 2):
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return statistics.median(gaps)


def floor(model, dtype) -> dict:
    """Seconds of each projection kind (all layers together) and of the output head, alone at decode shapes."""
    layers = model.layers
    out = {}
    for name in PROJECTIONS:
        modules = [_module(layer, name) for layer in layers]
        inputs = [mx.random.normal((1, 1, _in_features(m))).astype(dtype) for m in modules]
        mx.eval(inputs)
        out[name.split(".")[-1]] = timed(
            lambda modules=modules, inputs=inputs: mx.eval([m(x) for m, x in zip(modules, inputs)])
        )
    hidden = mx.random.normal((1, 1, model.config.text.hidden_size)).astype(dtype)
    mx.eval(hidden)
    out["head"] = timed(lambda: mx.eval(head(model, hidden)))
    return out


def attention_products(model, cache, dtype) -> float:
    """Seconds of q·kᵀ and weights·v in every layer (the kernels MLX's attention runs on the CPU), alone."""
    cfg = model.config.text
    kv, per_kv, hd = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    counts = [c.key_positions(1)[0].size for c in cache]
    queries = [mx.random.normal((1, kv, per_kv, hd)).astype(dtype) for _ in counts]
    keys = [mx.random.normal((1, kv, n, hd)).astype(dtype) for n in counts]
    weights = [mx.softmax(mx.random.normal((1, kv, per_kv, n)), axis=-1).astype(dtype) for n in counts]
    mx.eval(queries, keys, weights)
    return timed(
        lambda: mx.eval(
            [q @ k.swapaxes(-1, -2) for q, k in zip(queries, keys)] + [w @ v for w, v in zip(weights, keys)]
        )
    )


def head(model, h):
    return model.logits(h) if hasattr(model, "logits") else model.language_model.logits(h)


def _module(layer, dotted: str):
    for part in dotted.split("."):
        layer = getattr(layer, part)
    return layer


def _in_features(module) -> int:
    if isinstance(module, nn.QuantizedLinear):
        return module.weight.shape[1] * 32 // module.bits
    return module.weight.shape[1]


def pieces(model, cache, dtype) -> dict:
    """The step's other operations at their decode shapes, each kind over all layers in one evaluation."""
    from mlx_gemma3.model.text import RMSNorm

    cfg = model.config.text
    layers = model.layers
    hidden, heads, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out = {}
    x = mx.random.normal((1, 1, hidden)).astype(dtype)
    q = mx.random.normal((1, heads, 1, hd)).astype(dtype)
    mx.eval(x, q)
    # attention over as many keys as each layer's cache hands attention for the next token
    fetched, masks = [], []
    for c in cache[: len(layers)]:
        keys, values = c.fetch() if c.window is None else (c.store.decode(c.keys), c.store.decode(c.values))
        n = c.key_positions(1)[0].size
        fetched.append((keys[:, :, :n], values[:, :, :n]))
        masks.append(c.make_mask(1))
    mx.eval([a for kv_pair in fetched for a in kv_pair], [m for m in masks if m is not None])
    scale = cfg.query_pre_attn_scalar**-0.5
    out["attention"] = timed(
        lambda: mx.eval(
            [mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=m) for (k, v), m in zip(fetched, masks)]
        )
    )
    windows = [c.window for c in cache]
    out["attention_keys"] = {
        "full": fetched[windows.index(None)][0].shape[2],
        "sliding": fetched[[w is not None for w in windows].index(True)][0].shape[2],
    }
    norms = [RMSNorm(hidden, cfg.rms_norm_eps) for _ in range(4 * len(layers) + 1)]
    qk_norms = [RMSNorm(hd, cfg.rms_norm_eps) for _ in range(2 * len(layers))]
    kx = mx.random.normal((1, 1, kv, hd)).astype(dtype)
    qx = mx.random.normal((1, 1, heads, hd)).astype(dtype)
    mx.eval(kx, qx, [n.parameters() for n in norms + qk_norms])
    out["norms"] = timed(
        lambda: mx.eval([n(x) for n in norms] + [n(qx if i % 2 else kx) for i, n in enumerate(qk_norms)])
    )
    ropes = [layer.self_attn.rope for layer in layers]
    kk = mx.random.normal((1, kv, 1, hd)).astype(dtype)
    mx.eval(kk)
    offset = cache[0].offset
    out["rope"] = timed(lambda: mx.eval([r(q, offset=offset) for r in ropes] + [r(kk, offset=offset) for r in ropes]))
    out["mask"] = timed(lambda: mx.eval([m for m in model.model.masks(1, cache, None).values() if m is not None]))
    out["embedding"] = timed(lambda: mx.eval(model.model.embed(mx.array([[1234]]))))
    logits = mx.random.normal((1, cfg.vocab_size)).astype(dtype)
    mx.eval(logits)
    out["argmax"] = timed(lambda: mx.eval(mx.argmax(logits, axis=-1)))
    gates = [mx.random.normal((1, 1, cfg.intermediate_size)).astype(dtype) for _ in layers]
    mx.eval(gates)
    out["gelu_mul"] = timed(lambda: mx.eval([nn.gelu_approx(g) * g for g in gates]))
    out["residual_adds"] = timed(lambda: mx.eval([x + x for _ in range(2 * len(layers))]))
    return out


def cache_write_time(model, context: int, dtype) -> float:
    """One token written into every layer's cache (sliding ring or growing buffer), evaluated."""
    cfg = model.config.text
    cache = model.make_cache()
    fill(cache, context, cfg.num_key_value_heads, cfg.head_dim, dtype)
    k = mx.random.normal((1, cfg.num_key_value_heads, 1, cfg.head_dim)).astype(dtype)
    mx.eval(k)

    def write():
        mx.eval([c.update_and_fetch(k, k) for c in cache])

    return timed(write, repeats=8)


def profile_ours(folder: str, context: int, steps: int, compute_dtype) -> dict:
    import mlx_gemma3

    model, _ = mlx_gemma3.load(folder, compute_dtype=compute_dtype)
    cfg = model.config.text
    dtype = model.model.norm.weight.dtype
    result = {
        "model": folder,
        "engine": "mlx_gemma3",
        "context": context,
        "compute_dtype": str(dtype).removeprefix("mlx.core."),
    }
    cache = model.make_cache()
    fill(cache, context, cfg.num_key_value_heads, cfg.head_dim, dtype)
    result.update(step_times(model, cache, steps))
    cache = model.make_cache()
    fill(cache, context, cfg.num_key_value_heads, cfg.head_dim, dtype)
    result["pipelined_token_s"] = pipelined_time(model, cache, steps)
    cache = model.make_cache()
    fill(cache, context, cfg.num_key_value_heads, cfg.head_dim, dtype)
    result["floor_by_kind"] = {**floor(model, dtype), "attention_products": attention_products(model, cache, dtype)}
    result["floor_s"] = sum(result["floor_by_kind"].values())
    result["projections_and_head_s"] = result["floor_s"] - result["floor_by_kind"]["attention_products"]
    result["matmuls_s"] = result["projections_and_head_s"] - result["floor_by_kind"]["head"]
    result["pieces"] = pieces(model, cache, dtype)
    result["pieces"]["cache_write"] = cache_write_time(model, context, dtype)
    result["overhead_s"] = result["step_s"] - result["floor_s"]
    result["overhead_pct"] = 100 * result["overhead_s"] / result["step_s"]
    result["overhead_vs_projections_pct"] = (
        100 * (result["step_s"] - result["projections_and_head_s"]) / result["step_s"]
    )
    result["pipelined_overhead_pct"] = (
        100 * (result["pipelined_token_s"] - result["floor_s"]) / result["pipelined_token_s"]
    )
    return result


def profile_mlx_lm(folder: str, context: int, steps: int) -> dict:
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = mlx_lm.load(folder)
    args = model.args
    dtype = model.model.norm.weight.dtype
    cache = make_prompt_cache(model)
    fill(cache, context, args.num_key_value_heads, args.head_dim, dtype)
    result = {
        "model": folder,
        "engine": "mlx-lm",
        "context": context,
        "compute_dtype": str(dtype).removeprefix("mlx.core."),
    }
    result.update(step_times(model, cache, steps))
    return result


def report(rows: list[dict]) -> str:
    lines = [
        "| engine | model | dtype | context | step (sync) ms | graph build ms | pipelined token ms | projections ms | "
        "head ms | attention products ms | floor ms | overhead | overhead beyond projections + head | "
        "whole attention ms | keys full/sliding |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = lambda v: "–" if v is None else f"{1000 * v:.1f}"  # noqa: E731
        pct = lambda key, r=r: "–" if key not in r else f"{r[key]:.1f} %"  # noqa: E731
        p, kinds = r.get("pieces", {}), r.get("floor_by_kind", {})
        keys = p.get("attention_keys")
        held = "–" if not keys else f"{keys['full']}/{keys['sliding']}"
        lines.append(
            f"| {r['engine']} | {Path(r['model']).name} | {r['compute_dtype']} | {r['context']} | {ms(r['step_s'])} | {ms(r['build_s'])} | "
            f"{ms(r.get('pipelined_token_s'))} | {ms(r.get('matmuls_s'))} | {ms(kinds.get('head'))} | {ms(kinds.get('attention_products'))} | "
            f"{ms(r.get('floor_s'))} | {pct('overhead_pct')} | {pct('overhead_vs_projections_pct')} | {ms(p.get('attention'))} | {held} |"
        )
    return "\n".join(lines)


def main() -> None:
    from mlx_gemma3.model.config import FLOAT_DTYPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="mlx_gemma3 model folder (repeatable)")
    parser.add_argument("--mlx-lm-model", action="append", default=[], help="mlx-lm folder of the same weights")
    parser.add_argument("--contexts", default="64,512", help="comma list of context lengths (tokens in the cache)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--compute-dtype", choices=FLOAT_DTYPES)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "profile.json")
    args = parser.parse_args()
    dtype = getattr(mx, args.compute_dtype) if args.compute_dtype else None
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        for folder in args.model:
            rows.append(profile_ours(folder, context, args.steps, dtype))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "pieces"}), file=sys.stderr, flush=True)
        for folder in args.mlx_lm_model:
            rows.append(profile_mlx_lm(folder, context, args.steps))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    text = report(rows)
    print(text)
    for r in rows:
        if "pieces" in r:
            parts = ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in r["pieces"].items() if isinstance(v, float))
            kinds = ", ".join(f"{k} {1000 * v:.1f}" for k, v in r["floor_by_kind"].items())
            print(f"\n{Path(r['model']).name} @ {r['context']}: floor by kind (ms): {kinds}\n  other pieces: {parts}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"rows": rows, "table_markdown": text, "mlx": mx.__version__, "device": str(mx.default_device())}, indent=2
        )
    )
    print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()

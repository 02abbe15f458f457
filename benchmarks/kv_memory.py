"""KV-cache bytes held by mlx_gemma3's caches against the formula of docs/model.md §9, from 1K to 32K tokens.

    python benchmarks/kv_memory.py --model FOLDER [--tokens 1024,2048,4096,8192,16384,32768]
        [--dtypes bfloat16,float32] [--kv-bits 8] [--json results/kv_memory.json]

Formula: KV per token per layer = 2 · kv_heads · head_dim · bytes; full layers hold every token, sliding
layers never more than the window W. The caches come from `model.make_cache()` and are filled synthetically
(update_and_fetch with random keys and values in 4096-token chunks, as a chunked prefill writes them); bytes
are the caches' own `nbytes` (buffers actually allocated, preallocation included). Only config.json is
read: no weights are loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent
CHUNK = 4096


def formula(cfg, tokens: int, bytes_per: float) -> dict:
    from mlx_gemma3.model.memory import kv_bytes_by_kind

    full, sliding = kv_bytes_by_kind(cfg, tokens, bytes_per)
    out = {"full": full, "sliding": sliding, "total": full + sliding}
    out["without_rotating"] = cfg.num_hidden_layers * tokens * 2 * cfg.num_key_value_heads * cfg.head_dim * bytes_per
    return out


def measured(model, cfg, tokens: int, dtype, kv_bits: int | None) -> dict:
    cache = model.make_cache(kv_bits=kv_bits)
    done = 0
    while done < tokens:
        n = min(CHUNK, tokens - done)
        for layer in cache:
            k = mx.random.normal((1, cfg.num_key_value_heads, n, cfg.head_dim)).astype(dtype)
            layer.update_and_fetch(k, k)
            mx.eval(layer.state)
        done += n
    full = sum(c.nbytes for c in cache if c.window is None)
    sliding = sum(c.nbytes for c in cache if c.window is not None)
    return {"full": full, "sliding": sliding, "total": full + sliding, "offset": cache[0].offset}


def main() -> None:
    from mlx_gemma3.model.config import load_config
    from mlx_gemma3.model.quantize import DEFAULT_GROUP_SIZE, KV_BITS
    from mlx_gemma3.model.weights import build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Gemma 3 folder (only its config.json is read)")
    parser.add_argument("--tokens", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--kv-bits", type=int, choices=KV_BITS, help="also measure a quantized KV cache")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "kv_memory.json")
    args = parser.parse_args()
    config = load_config(args.model)
    cfg = config.text
    model = build_model(config)  # parameters stay lazy: never evaluated, nothing allocated
    rows = []
    variants = [(d, None) for d in args.dtypes.split(",")] + ([("bfloat16", args.kv_bits)] if args.kv_bits else [])
    for dtype_name, bits in variants:
        for tokens in [int(t) for t in args.tokens.split(",")]:
            # a quantized cache stores bits/8 bytes per value plus a scale and a bias (in the input dtype) per group
            size = getattr(mx, dtype_name).size
            per_value = size if bits is None else bits / 8 + 2 * size / DEFAULT_GROUP_SIZE
            expect = formula(cfg, tokens, per_value)
            got = measured(model, cfg, tokens, getattr(mx, dtype_name), bits)
            rows.append(
                {
                    "dtype": dtype_name,
                    "kv_bits": bits,
                    "tokens": tokens,
                    "measured": got,
                    "formula": expect,
                    "ratio": got["total"] / expect["total"],
                    "sliding_share": got["sliding"] / got["total"],
                    "sliding_over_formula": got["sliding"] / expect["sliding"],
                    "saving_vs_all_full": 1 - got["total"] / expect["without_rotating"],
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = [
        "| KV dtype | tokens | measured MB | formula MB | measured ÷ formula | full layers MB | sliding layers MB | sliding share | saved vs no rotating cache |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kind = r["dtype"] if r["kv_bits"] is None else f"{r['kv_bits']}-bit (group {DEFAULT_GROUP_SIZE})"
        m = r["measured"]
        lines.append(
            f"| {kind} | {r['tokens']} | {m['total'] / 1e6:.2f} | {r['formula']['total'] / 1e6:.2f} | {r['ratio']:.4f} | "
            f"{m['full'] / 1e6:.2f} | {m['sliding'] / 1e6:.3f} | {100 * r['sliding_share']:.1f} % | "
            f"{100 * r['saving_vs_all_full']:.1f} % |"
        )
    text = "\n".join(lines)
    print(text)
    checks = []
    for dtype_name, bits in variants:
        mine = [r for r in rows if r["dtype"] == dtype_name and r["kv_bits"] == bits]
        at_32k = [r for r in mine if r["tokens"] == 32768]
        capped = {r["measured"]["sliding"] for r in mine if r["tokens"] >= cfg.sliding_window}
        checks.append(
            {
                "dtype": dtype_name,
                "kv_bits": bits,
                "within_5pct_at_32k": None if not at_32k else abs(at_32k[0]["ratio"] - 1) <= 0.05,
                "ratio_at_32k": None if not at_32k else at_32k[0]["ratio"],
                "sliding_bytes_constant_from_window_on": len(capped) == 1,
                "sliding_bytes": sorted(capped),
            }
        )
    for c in checks:
        kind = c["dtype"] if c["kv_bits"] is None else f"{c['kv_bits']}-bit"
        print(
            f"\n{kind}: measured/formula at 32K = "
            f"{c['ratio_at_32k']:.4f} (within 5 %: {c['within_5pct_at_32k']}); sliding layers' bytes constant for "
            f"every context ≥ W: {c['sliding_bytes_constant_from_window_on']} ({', '.join(f'{b / 1e6:.3f} MB' for b in c['sliding_bytes'])})"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "model": args.model,
                "config": {
                    "layers": cfg.num_hidden_layers,
                    "kv_heads": cfg.num_key_value_heads,
                    "head_dim": cfg.head_dim,
                    "window": cfg.sliding_window,
                },
                "rows": rows,
                "checks": checks,
                "table_markdown": text,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()

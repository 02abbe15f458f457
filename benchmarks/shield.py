"""ShieldGemma 2 batching: the shared prefix prefilled once per image against every (image, policy) prompt run
whole, on the real tokenizer's prompts and a random-weight model, in one run.

    python benchmarks/shield.py [--images 2] [--layers 4] [--repeats 3] [--json results/shield.json]

The prompts are the real ones (ShieldGemma 2's template, the 3 built-in policies, 256 image tokens), tokenized
with Gemma 3's tokenizer from the demo 270M folder. The model has the 270M's text width (640, 262208-row
vocabulary) with `--layers` layers and a small random vision tower giving 256 tokens per image: the figure is
the ratio of two ways of computing the same numbers, not ShieldGemma 2's own speed (a 4B has 34 layers of
width 2560). Both ways encode each image once; `whole` runs the image × policy prompts left-padded as one
batch (what transformers does), `shared` is `mlx_gemma3.shield.classify`'s path. They must agree on every
Yes/No logit (checked); times are medians of `--repeats` after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

HERE = Path(__file__).resolve().parent
TEXT = dict(
    hidden_size=640,
    intermediate_size=2048,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    vocab_size=262_208,
    sliding_window=512,
)
VISION = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=14
)


def random_shield(layers: int):
    from mlx_gemma3.model.config import parse_config
    from mlx_gemma3.model.weights import build_model

    config = parse_config(
        {
            "model_type": "shieldgemma2",
            "text_config": {**TEXT, "num_hidden_layers": layers},
            "vision_config": VISION,
            "mm_tokens_per_image": 256,
            "dtype": "float32",
        }
    )
    mx.random.seed(0)
    model = build_model(config)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.02, model.parameters()))
    mx.eval(model.parameters())
    return model


def whole_logits(model, prompts: list[list[int]], pixels: np.ndarray, answers: list[int]) -> np.ndarray:
    """Every (image, policy) prompt in full, left-padded into one batch; each image's features reused."""
    from mlx_gemma3.model.cache import batch_cache, left_padded
    from mlx_gemma3.model.gemma3 import image_blocks

    features = model.encode_images(mx.array(pixels))
    rows = [prompt for _ in range(len(pixels)) for prompt in prompts]
    ids, padding = left_padded(rows)
    features = mx.repeat(features, len(prompts), axis=0)
    text, image_token = model.language_model.model, model.config.vision.image_token_id
    h = model.splice(np.array(ids), text.embed(mx.where(ids == image_token, 0, ids)), features)
    cache = batch_cache(model.make_cache(), padding)
    hidden = text(h, cache, mx.array(image_blocks(np.array(ids), image_token)))
    return np.array(model.language_model.logits(hidden[:, -1])[:, mx.array(answers)].astype(mx.float32))


def timed(run, repeats: int):
    run()  # warm-up: kernels compiled, weights touched
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    import mlx_gemma3
    from mlx_gemma3.generation.classify import NO_TOKEN_ID, YES_TOKEN_ID, answer_logits, shared_prefix
    from mlx_gemma3.processing.processor import Processor
    from mlx_gemma3.processing.shield_prompt import DEFAULT_POLICIES, shield_prompt_ids
    from mlx_gemma3.processing.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    model = random_shield(args.layers)
    processor = Processor(Tokenizer.from_folder(mlx_gemma3.demo_model()), model.config)
    prompts = [shield_prompt_ids(processor, text) for text in DEFAULT_POLICIES.values()]
    shared = shared_prefix(prompts, model.config.vision)
    pixels = np.random.RandomState(0).uniform(-1, 1, (args.images, 224, 224, 3)).astype(np.float32)
    answers = [YES_TOKEN_ID, NO_TOKEN_ID]
    whole_s, whole = timed(lambda: whole_logits(model, prompts, pixels, answers), args.repeats)
    shared_s, ours = timed(lambda: answer_logits(model, prompts, shared, pixels, answers), args.repeats)
    delta = float(np.abs(whole - ours).max())
    assert delta <= 1e-3, f"the two ways disagree by {delta}"
    whole_tokens = args.images * sum(map(len, prompts))
    shared_tokens = args.images * (shared + sum(len(p) - shared for p in prompts))
    report = {
        "images": args.images,
        "policies": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "shared_prefix_tokens": shared,
        "layers": args.layers,
        "text_hidden": TEXT["hidden_size"],
        "tokens_prefilled": {"whole": whole_tokens, "shared": shared_tokens},
        "seconds": {"whole": whole_s, "shared": shared_s},
        "speedup": whole_s / shared_s,
        "max_logit_difference": delta,
        "device": str(mx.default_device()),
    }
    print(
        f"{args.images} images × {len(prompts)} policies; prompts of {report['prompt_tokens']} tokens, "
        f"{shared} shared (the image's 256 among them)"
    )
    print(f"{'way':<8} {'tokens prefilled':>16} {'seconds':>9}")
    for way in ("whole", "shared"):
        print(f"{way:<8} {report['tokens_prefilled'][way]:>16} {report['seconds'][way]:>9.3f}")
    print(f"shared prefix: {report['speedup']:.2f}× faster, Yes/No logits within {delta:.1e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

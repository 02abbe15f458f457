"""Run by each rank of the distributed tests: load a share of a model, then logits, greedy tokens and bytes held.

Usage: python tests/distributed_worker.py MODEL MODE OUT.npz PROMPT_IDS_JSON NEW_TOKENS [IMAGE]"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import mlx_gemma3
from mlx_gemma3.generation.text_stream import Options, generate_ids


def main(model_dir: str, mode: str, out: str, prompt_json: str, new_tokens: str, image: str | None = None) -> None:
    mx.reset_peak_memory()
    model, processor = mlx_gemma3.load(model_dir, distributed=mode)
    text = model.language_model if hasattr(model, "language_model") else model
    held = sum(v.nbytes for _, v in tree_flatten(text.parameters()))
    active = mx.get_active_memory()
    rank = mx.distributed.init().rank()
    prompt = json.loads(prompt_json)
    features = None
    if image is not None:
        features = model.encode_images(mx.array(np.load(image)))
    logits = model(mx.array([prompt]), image_features=features) if features is not None else model(mx.array([prompt]))
    logits = np.array(logits.astype(mx.float32))  # now: every rank runs the exchanges in the same order
    opts = Options.of({"max_tokens": int(new_tokens)})
    tokens = [r.token for r in generate_ids(model, processor, prompt, None, opts, features)]
    np.savez(f"{out}.rank{rank}.npz", logits=logits, tokens=np.array(tokens), held=held, active=active)
    print(f"rank {rank}: weights held {held} bytes, active memory after load {active} bytes", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

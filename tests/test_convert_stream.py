"""Converting shard by shard: peak memory stays near the largest input shard; Ctrl-C leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TEXT
from safetensors.numpy import save_file

WIDE = {
    **TINY_TEXT,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "query_pre_attn_scalar": 128,
    "vocab_size": 4096,
}
MARGIN = 32 * 2**20  # allocator slack and the converter's own bookkeeping


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """A 4-shard float32 Gemma3ForCausalLM checkpoint (~65 MB per shard), written tensor by tensor."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**WIDE)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Gemma3ForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    folder = tmp_path_factory.mktemp("wide")
    config.save_pretrained(folder)
    rng = np.random.default_rng(0)
    shards = [
        {k: s for k, s in shapes.items() if f"layers.{i}." in k or (i == 0 and "layers." not in k)} for i in range(4)
    ]
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00004.safetensors"
        save_file({k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shard.items()}, str(folder / name))
        weight_map.update({k: name for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, max((folder / n).stat().st_size for n in set(weight_map.values()))


# Peak resident memory of this process: Linux's VmHWM (ru_maxrss would carry the forking parent's peak).
PEAK_SCRIPT = """
import re, sys
from mlx_gemma3.convert.__main__ import main
peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before = peak()
assert main(sys.argv[1:]) == 0
print("PEAK", before, peak())
"""


@pytest.mark.parametrize("extra", [[], ["--dtype", "bfloat16"], ["-q"]], ids=["float32", "bfloat16", "4-bit"])
@pytest.mark.slow
def test_peak_memory_stays_near_the_largest_shard(wide_checkpoint, tmp_path, extra):
    folder, largest = wide_checkpoint
    args = ["--hf-path", str(folder), "--mlx-path", str(tmp_path / "out"), *extra]
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    before, after = map(int, result.stdout.split("PEAK")[1].split())
    grown = max(after - before, 0)
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(
        f"{extra}: peak grew {grown / 2**20:.0f} MiB; largest shard {largest / 2**20:.0f} MiB, all {total / 2**20:.0f} MiB"
    )
    assert grown <= 1.5 * largest + MARGIN


def test_ctrl_c_leaves_nothing(wide_checkpoint, tmp_path):
    folder, _ = wide_checkpoint
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mlx_gemma3.convert", "--hf-path", str(folder), "--mlx-path", str(out), "-q"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_shard_writer_streams_row_blocks_into_valid_safetensors(tmp_path):
    import mlx.core as mx
    from safetensors.torch import load_file

    from mlx_gemma3.convert.output import ShardWriter

    rng = np.random.default_rng(1)
    tensors = {
        "a.weight": mx.array(rng.integers(0, 2**32, (6, 4), dtype=np.uint32)),
        "b.scales": mx.array(rng.standard_normal((5, 3), dtype=np.float32)).astype(mx.bfloat16),
        "c.conv": mx.array(rng.standard_normal((2, 3, 4, 5), dtype=np.float32)).transpose(0, 2, 3, 1),
        "d.norm": mx.array(rng.standard_normal(7, dtype=np.float32)),
    }
    writer = ShardWriter(tmp_path, max_bytes=128)
    slot = writer.reserve("a.weight", mx.uint32, (6, 4))
    for start in (4, 0, 2):  # blocks of rows, in any order
        slot.write(start, tensors["a.weight"][start : start + 2])
    for key in ("b.scales", "c.conv", "d.norm"):
        writer.add(key, tensors[key])
    files = writer.close()
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = {k: v for f in files for k, v in mx.load(str(f)).items()}
    assert loaded.keys() == tensors.keys()
    assert all(loaded[k].dtype == v.dtype and mx.array_equal(loaded[k], v).item() for k, v in tensors.items())
    read = {k: v for f in files for k, v in load_file(str(f)).items()}  # the safetensors library reads them too
    assert read.keys() == tensors.keys() and read["b.scales"].float().tolist() == tensors["b.scales"].tolist()
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []


def test_an_interrupt_just_after_the_work_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    """The race test_ctrl_c_leaves_nothing could hit: Ctrl-C after the .partial folder exists, before cleanup
    was armed."""
    from mlx_gemma3.convert.output import output_folder

    make = Path.mkdir

    def mkdir_then_interrupt(self, *args, **kwargs):
        make(self, *args, **kwargs)
        if ".partial-" in self.name:
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", mkdir_then_interrupt)
    with pytest.raises(KeyboardInterrupt), output_folder(tmp_path / "out", force=False):
        pass
    assert list(tmp_path.iterdir()) == []

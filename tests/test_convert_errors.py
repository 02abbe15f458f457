"""The converter CLI on bad input: one line on stderr, non-zero exit, no traceback, nothing left on disk."""

from __future__ import annotations

import pytest
from conftest import convert, edit_config, run_cli
from safetensors.torch import load_file, save_file


def run_convert(hf_dir, mlx_dir, *extra):
    return run_cli("mlx_gemma3.convert", "--hf-path", str(hf_dir), "--mlx-path", str(mlx_dir), *extra)


def assert_one_line_error(result, fragment):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]


def leftovers(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}"))


def drop_tensor(hf_dir):
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, path)


def misshape_tensor(hf_dir):
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]
    save_file(tensors, path)


def truncate(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def corrupt_header(hf_dir):
    path = hf_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32
    path.write_bytes(bytes(data))


def index_names_missing_shard(hf_dir):
    import json

    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )


def index_names_shard_outside(hf_dir):
    import json

    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": "../elsewhere/model.safetensors"}})
    )


BAD_INPUTS = {
    "index_names_shard_outside": (
        index_names_shard_outside,
        "names shard(s) outside its folder ('../elsewhere/model.safetensors')",
    ),
    "corrupt_header": (corrupt_header, "truncated or not safetensors"),
    "index_names_missing_shard": (index_names_missing_shard, "names missing shard(s) model-00002-of-00002.safetensors"),
    "missing_config": (lambda d: (d / "config.json").unlink(), "no config.json in"),
    "unknown_model_type": (lambda d: edit_config(d, lambda c: c.update(model_type="llama")), "is not Gemma 3"),
    "missing_tensor": (drop_tensor, "missing tensor model.layers.1.mlp.up_proj.weight"),
    "misshaped_tensor": (misshape_tensor, "model.layers.0.self_attn.k_proj.weight has shape (31, 64)"),
    "truncated_safetensors": (truncate, "truncated or not safetensors"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "no *.safetensors weights"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(hf_text, tmp_path, case):
    hf_dir, _ = hf_text
    damage, fragment = BAD_INPUTS[case]
    damage(hf_dir)
    out = tmp_path / "out"
    result = run_convert(hf_dir, out)
    assert_one_line_error(result, fragment)
    assert not out.exists() and leftovers(out) == []


def test_missing_input_folder(tmp_path):
    result = run_convert(tmp_path / "nowhere", tmp_path / "out")
    assert_one_line_error(result, "does not exist")


def test_existing_output_needs_force(hf_text, tmp_path):
    hf_dir, _ = hf_text
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert_one_line_error(run_convert(hf_dir, out), "already exists")
    assert (out / "keep.txt").read_text() == "user data"
    result = run_convert(hf_dir, out, "--force")
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert leftovers(out) == []


def test_input_is_never_modified(hf_text, tmp_path):
    hf_dir, _ = hf_text
    before = {p.name: p.read_bytes() for p in hf_dir.iterdir()}
    convert(hf_dir, tmp_path / "out", "--dtype", "bfloat16")
    assert {p.name: p.read_bytes() for p in hf_dir.iterdir()} == before


def test_failed_force_keeps_old_output(hf_text, tmp_path):
    hf_dir, _ = hf_text
    out = convert(hf_dir, tmp_path / "out")
    good = (out / "model.safetensors").read_bytes()
    truncate(hf_dir)
    assert_one_line_error(run_convert(hf_dir, out, "--force"), "truncated")
    assert (out / "model.safetensors").read_bytes() == good and leftovers(out) == []


def test_help_exits_zero():
    result = run_cli("mlx_gemma3.convert", "--help")
    assert result.returncode == 0 and "--hf-path" in result.stdout


BAD_QUANTIZATION = {
    "bits": (["-q", "--q-bits", "3"], "bits in (4, 8)"),
    "group": (["-q", "--q-group-size", "16"], "group size in (32, 64, 128)"),
    "recipe": (["-q", "--quant-recipe", "fancy"], "unknown quantization recipe 'fancy'"),
    "bits_not_a_number": (["-q", "--q-bits", "four"], "--q-bits"),
}


@pytest.mark.parametrize("case", sorted(BAD_QUANTIZATION))
def test_bad_quantization_options(hf_text, tmp_path, case):
    hf_dir, _ = hf_text
    args, fragment = BAD_QUANTIZATION[case]
    out = tmp_path / "out"
    assert_one_line_error(run_convert(hf_dir, out, *args), fragment)
    assert not out.exists() and leftovers(out) == []


def test_group_size_that_divides_no_layer(tmp_path):
    from conftest import tiny_text_model

    tiny_text_model(intermediate_size=96).save_pretrained(tmp_path / "hf")  # input widths 64 and 96
    out = tmp_path / "out"
    assert_one_line_error(run_convert(tmp_path / "hf", out, "-q", "--q-group-size", "128"), "divides no layer")
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize(
    "umask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)], ids=["umask 022", "umask 027"]
)
def test_output_permissions_follow_the_umask(hf_text, tmp_path, umask, folder_mode, file_mode):
    import os
    import stat

    hf_dir, _ = hf_text
    previous = os.umask(umask)
    try:
        out = convert(hf_dir, tmp_path / "out")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode
    files = list(out.iterdir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == file_mode for f in files), [
        (f.name, oct(f.stat().st_mode)) for f in files
    ]

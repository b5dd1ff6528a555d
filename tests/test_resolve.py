"""CPU tests for engine.resolve (model spec -> local model directory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.resolve import ModelNotFoundError, default_model_dir, hf_hub_cache_dir, resolve_model

ALIASES = {
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
}


@pytest.fixture(autouse=True)
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolated HOME/cwd, no HF env vars, deterministic alias table."""
    home = tmp_path / "home"
    home.mkdir()
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "LAYERSTREAM_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


def make_model(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def make_snapshot(cache: Path, repo_id: str, rev: str, mtime: float | None = None) -> Path:
    snap = make_model(cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / rev)
    if mtime is not None:
        os.utime(snap, (mtime, mtime))
    return snap


def test_directory_absolute_and_relative(tmp_path: Path) -> None:
    model = make_model(tmp_path / "models" / "tiny")
    assert resolve_model(str(model)) == model.resolve()
    assert resolve_model("models/tiny") == model.resolve()
    assert resolve_model("./models/tiny/") == model.resolve()


def test_tilde_expansion(env: Path) -> None:
    model = make_model(env / "m")
    assert resolve_model("~/m") == model.resolve()


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json.*safetensors.*tokenizer\.json"):
        resolve_model("./empty")


def test_a_file_of_a_model_directory_points_at_the_directory(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    for name in ("model.safetensors", "config.json"):
        with pytest.raises(FileNotFoundError,
                           match=f"a file of a model directory; pass the directory: --model {model}$"):
            resolve_model(str(model / name))
    (tmp_path / "loose.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_model(str(tmp_path / "loose.bin"))


def test_nonexistent_path() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*does-not-exist"):
        resolve_model("./does-not-exist")
    with pytest.raises(FileNotFoundError, match="nope/deeper/x"):
        resolve_model("nope/deeper/x")


def test_repo_id_via_refs_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    pinned = make_snapshot(cache, "Qwen/Qwen3-8B", "aaa", mtime=1_000)
    make_snapshot(cache, "Qwen/Qwen3-8B", "bbb", mtime=2_000)  # newer, but not main
    (cache / "models--Qwen--Qwen3-8B" / "refs").mkdir()
    (cache / "models--Qwen--Qwen3-8B" / "refs" / "main").write_text("aaa\n")
    assert resolve_model("Qwen/Qwen3-8B") == pinned.resolve()


def test_repo_id_via_newest_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cache = tmp_path / "hf" / "hub"
    make_snapshot(cache, "Qwen/Qwen3-8B", "old", mtime=1_000)
    newest = make_snapshot(cache, "Qwen/Qwen3-8B", "new", mtime=3_000)
    incomplete = cache / "models--Qwen--Qwen3-8B" / "snapshots" / "newer-no-config"
    incomplete.mkdir()
    os.utime(incomplete, (9_000, 9_000))
    assert resolve_model("Qwen/Qwen3-8B") == newest.resolve()


def test_alias_found_via_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    snap = make_snapshot(tmp_path / "xdg" / "huggingface" / "hub", "Qwen/Qwen2.5-7B-Instruct", "r1")
    assert resolve_model("qwen2.5-7b") == snap.resolve()


def test_alias_case_insensitive_falls_back_to_base(env: Path) -> None:
    cache = env / ".cache" / "huggingface" / "hub"  # default location under HOME
    snap = make_snapshot(cache, "meta-llama/Llama-3.1-8B", "r1")
    assert resolve_model("LLaMA-3.1-8B") == snap.resolve()


def test_alias_not_cached_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_model("qwen2.5-7b")
    msg = str(exc.value)
    assert "qwen2.5-7b" in msg
    assert str(cache / "models--Qwen--Qwen2.5-7B-Instruct" / "snapshots") in msg
    assert str(cache / "models--Qwen--Qwen2.5-7B" / "snapshots") in msg
    assert "huggingface-cli download Qwen/Qwen2.5-7B-Instruct" in msg
    assert "hf download Qwen/Qwen2.5-7B-Instruct" in msg
    assert "python -m tools.synth --preset qwen2.5-7b --out DIR" in msg
    assert "--model DIR" in msg
    assert isinstance(exc.value, FileNotFoundError)


def test_repo_id_not_cached_suggests_matching_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="--preset qwen3-8b"):
        resolve_model("Qwen/Qwen3-8B")


def test_unknown_alias_lists_aliases_and_close_match() -> None:
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_model("qwen2.5-7")
    msg = str(exc.value)
    assert "Did you mean: qwen2.5-7b" in msg
    for alias in ALIASES:
        assert alias in msg


def test_hf_hub_cache_beats_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub, home = tmp_path / "hub", tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_hub_cache_dir() == hub
    make_snapshot(home / "hub", "Qwen/Qwen3-8B", "r1")
    with pytest.raises(ModelNotFoundError):
        resolve_model("Qwen/Qwen3-8B")
    winner = make_snapshot(hub, "Qwen/Qwen3-8B", "r2")
    assert resolve_model("Qwen/Qwen3-8B") == winner.resolve()


def test_default_model_dir(tmp_path: Path, env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_model_dir() == env / ".cache" / "layerstream" / "default-model"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_dir() == tmp_path / "xdg" / "layerstream" / "default-model"
    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "ls"))
    assert default_model_dir() == tmp_path / "ls" / "default-model"


def test_hub_cache_repo_folder_resolves_to_its_snapshot(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    old = make_snapshot(cache, "Qwen/Qwen2.5-7B-Instruct", "aaa", mtime=1_000_000)
    new = make_snapshot(cache, "Qwen/Qwen2.5-7B-Instruct", "bbb", mtime=2_000_000)
    repo = cache / "models--Qwen--Qwen2.5-7B-Instruct"
    assert resolve_model(str(repo)) == new.resolve()  # no refs/main: the newest usable snapshot
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa\n")
    assert resolve_model(str(repo) + "/") == old.resolve()


def test_hub_cache_repo_folder_without_usable_snapshot(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--Qwen--Qwen3-8B"
    (repo / "snapshots" / "partial").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as exc:
        resolve_model(str(repo))
    assert "hold no config.json" in str(exc.value) and "hf download Qwen/Qwen3-8B" in str(exc.value)

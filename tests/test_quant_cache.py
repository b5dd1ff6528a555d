"""The opt-in packed-layer cache (engine/quant/cache.py, ``--quant-cache``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.footprint import min_budget
from engine.generate import generate
from engine.quant import layout as layout_mod
from engine.sampling import SamplingParams
from engine.synth.writer import synthesize
from tests.helpers import make_engine


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "quant"


def _bins(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.bin"))


def _tokens(engine, n: int = 8) -> list[int]:
    return generate(engine, [[5, 9, 17, 3]], SamplingParams(), max_new_tokens=n).token_ids[0]


@pytest.mark.parametrize("kind", ["awq", "gptq8"])
def test_cache_written_once_then_read_as_spans(tmp_path: Path, cache: Path, kind: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    d = synthesize("tiny-qwen2", tmp_path / kind, quant=kind)
    want = _tokens(plain := make_engine(d))
    plain.close()
    eng = make_engine(d, quant_cache=True)
    files = _bins(cache)
    assert len(files) == 1 and not files[0].name.startswith(".")
    assert sorted(p.name for p in cache.iterdir()) == [files[0].name, files[0].name + ".stamp"]
    assert files[0].stat().st_size == eng.cfg.num_hidden_layers * eng.weights.layout.nbytes
    assert _tokens(eng) == want
    eng.close()

    def no_packing(*args, **kwargs):
        raise AssertionError("a cached layer was packed again")

    monkeypatch.setattr(layout_mod.QuantLayerLayout, "pack", no_packing)
    mtime = files[0].stat().st_mtime_ns
    for host in (1 << 30, 0):  # resident + pinned, then every layer from disk (raw spans of the cache)
        low = min_budget(eng.cfg, torch.float32, max_context=64, prefill_chunk=2048, quant=eng.quant)
        again = make_engine(d, quant_cache=True, vram_budget=low, host_budget=host)
        assert again.plan.streamed_layers and len(again.plan.disk_layers) == (0 if host else 3)
        assert _tokens(again) == want
        again.close()
    assert files[0].stat().st_mtime_ns == mtime and _bins(cache) == files


def test_cache_key_follows_the_checkpoint(tmp_path: Path, cache: Path) -> None:
    d = synthesize("tiny-qwen3", tmp_path / "awq", quant="awq")
    make_engine(d, quant_cache=True).close()
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    make_engine(d, quant_cache=True).close()
    assert len(_bins(cache)) == 2  # a changed file: a new key


def test_cache_skipped_or_failing_falls_back(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    d = synthesize("tiny-qwen3", tmp_path / "ct", quant="ct-int4")
    make_engine(d, quant_cache=True, dtype="bf16").close()  # its own bytes are canonical: nothing cached
    assert not cache.exists()
    blocker = tmp_path / "cache"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "quant").write_text("not a directory")
    a = synthesize("tiny-qwen3", tmp_path / "awq", quant="awq")
    want = _tokens(plain := make_engine(a))
    plain.close()
    eng = make_engine(a, quant_cache=True)
    assert "cannot write the packed-layer cache" in caplog.text
    assert _tokens(eng) == want  # packed on the host instead
    eng.close()


@pytest.mark.parametrize("change", ["same-size edit", "no stamp", "bad stamp"])
def test_a_cache_file_changed_since_written_is_packed_again(tmp_path: Path, cache: Path, change: str) -> None:
    """A cache file whose size, mtime or inode differ from its stamp (or without a readable stamp) is not read:
    the layers are packed and the file written again, and the tokens stay right."""
    d = synthesize("tiny-qwen2", tmp_path / "awq", quant="awq")
    want = _tokens(plain := make_engine(d))
    plain.close()
    make_engine(d, quant_cache=True).close()
    (f,) = _bins(cache)
    stamp = f.with_name(f.name + ".stamp")
    if change == "same-size edit":  # garbage over the first layer's bytes, the size unchanged
        with open(f, "r+b") as fh:
            fh.write(b"\x5a" * 4096)
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse clocks: a later mtime for sure
    elif change == "no stamp":
        stamp.unlink()
    else:
        stamp.write_text("[not a stamp")
    eng = make_engine(d, quant_cache=True)
    assert _tokens(eng) == want
    eng.close()
    assert f.read_bytes()[:4096] != b"\x5a" * 4096 and stamp.is_file()
    again = make_engine(d, quant_cache=True)  # read as written now
    assert _tokens(again) == want
    again.close()

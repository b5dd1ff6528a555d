"""kernels.tuning.untuned(): shapes not tuned yet run their default config, untimed and not kept;
the engine enters it for prompt chunks of <= 64 rows (the GEMV's range) only."""
from __future__ import annotations

import pytest
import torch

import kernels.attention_prefill as prefill_mod
import kernels.gemm as gemm_mod
import kernels.gemv as gemv_mod
import kernels.rope as rope_mod
from engine.engine import Engine, EngineOptions
from engine.generate import prefill
from engine.ops import TorchOps
from engine.ops_triton import TritonOps
from kernels.tuning import picks_like, tuning_suspended, untuned


def test_context_nests_and_resets_after_an_error():
    assert not tuning_suspended()
    with pytest.raises(RuntimeError):
        with untuned():
            with untuned():
                assert tuning_suspended()
            assert tuning_suspended()
            raise RuntimeError("boom")
    assert not tuning_suspended()


def _forbid(monkeypatch, module, name):
    def fail(*a, **k):
        raise AssertionError(f"{module.__name__}.{name} timed candidates inside untuned()")
    monkeypatch.setattr(module, name, fail)


def test_gemv_and_gemm_use_defaults_untimed_and_uncached(monkeypatch):
    _forbid(monkeypatch, gemv_mod, "_pick")
    _forbid(monkeypatch, gemm_mod, "_pick")
    x, w = torch.randn(20, 48), torch.randn(40, 48)
    out = torch.empty(20, 40)
    gemv_mod._TUNED.clear()
    gemm_mod._TUNED.clear()
    with untuned():
        assert gemv_mod._tuned(x, w, None, out, 32) is gemv_mod._DEFAULT_DOT
        assert gemv_mod._tuned(x[:1], w, None, out[:1], 1) is gemv_mod._DEFAULT_FMA
        cfg = gemm_mod._tuned(x, w, None, out, tma_ok=False)
    assert cfg.kwargs == gemm_mod._default_config(x.dtype).kwargs
    assert not gemv_mod._TUNED and not gemm_mod._TUNED  # a later call outside tunes the shape


def test_a_gemv_piece_runs_the_pick_of_its_whole(monkeypatch):
    """picks_like(rows): an untuned piece of a weight takes the whole's pick (tuned in this process), not the
    default (whose kernel a first burst pass built while serving: session 49 call2); outside untuned() nothing."""
    _forbid(monkeypatch, gemv_mod, "_pick")
    x, piece = torch.randn(16, 48), torch.randn(24, 48)
    out = torch.empty(16, 24)
    gemv_mod._TUNED.clear()
    whole = gemv_mod._candidates(16, 96, 48, 4, 1)[-1]
    assert whole is not gemv_mod._DEFAULT_DOT
    gemv_mod._TUNED[(16, 96, 48, x.dtype, False)] = whole
    try:
        with untuned(), picks_like(96):
            assert gemv_mod._tuned(x, piece, None, out, 16) is whole
        with untuned(), picks_like(24):  # the whole itself: its own key
            assert gemv_mod._tuned(x, piece, None, out, 16) is gemv_mod._DEFAULT_DOT
        with untuned():
            assert gemv_mod._tuned(x, piece, None, out, 16) is gemv_mod._DEFAULT_DOT
    finally:
        gemv_mod._TUNED.clear()


def test_prefill_attention_default_is_not_kept(monkeypatch):
    monkeypatch.setattr(prefill_mod, "_INTERPRET", False)
    monkeypatch.delenv("KERNELS_AUTOTUNE", raising=False)
    monkeypatch.setattr(prefill_mod.tuning_cache, "choose", lambda *a, **k: None)
    key, q = ("test-untuned",), torch.empty(1, 1, 1, 8)
    with untuned():
        assert prefill_mod._untimed_config(key, q) is not None
    assert key not in prefill_mod._TUNED
    assert prefill_mod._untimed_config(key, q) is None  # outside: time the candidates now


def test_rope_is_not_tunable_inside(monkeypatch):
    q = torch.empty(1, 1, 2, 8)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.delenv("KERNELS_AUTOTUNE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert rope_mod._tunable(q)
    with untuned():
        assert not rope_mod._tunable(q)


def test_triton_ops_suspend_tuning_for_short_chunks_only():
    ops = TritonOps()
    with ops.prompt_chunk(64):
        assert tuning_suspended()
    with ops.prompt_chunk(65):
        assert not tuning_suspended()
    with TorchOps().prompt_chunk(1):
        assert not tuning_suspended()


@pytest.mark.parametrize("lens,chunk,expect", [([5, 30], 2048, [60]), ([40], 16, [16, 16, 8])])
def test_prefill_passes_rows_per_chunk(tiny_qwen2_dir, monkeypatch, lens, chunk, expect):
    """rows = batch x chunk length (padding rows included: the matmuls see them), for each chunk of each
    layer (the prefill is layer-major)."""
    engine = Engine(tiny_qwen2_dir, EngineOptions(device="cpu", batch=len(lens), max_context=64,
                                                  prefill_chunk=chunk * len(lens)))
    seen = []
    real = engine.ops.prompt_chunk
    monkeypatch.setattr(engine.ops, "prompt_chunk", lambda rows: seen.append(rows) or real(rows))
    prefill(engine, [list(range(1, n + 1)) for n in lens])
    assert seen == expect * engine.cfg.num_hidden_layers

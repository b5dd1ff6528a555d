"""Tests for the GPU sampling kernels (argmax, top-k / top-p / min-p sampling) against their fp32 references."""
from __future__ import annotations

import pytest
import torch

from tests.kernel_utils import DEV, DTYPES, cuda_only, rand  # noqa: F401  (sets TRITON_INTERPRET first)

from kernels.sampling import argmax, filtered_probs, sample, sample_ref  # noqa: E402

# ----------------------------------------------------------------------------- argmax
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 100, 5000, 9001])
def test_argmax(dtype, vocab):
    logits = rand(3, vocab, dtype=dtype)
    assert torch.equal(argmax(logits), torch.argmax(logits, dim=-1))


def test_argmax_ties_nan_and_strided_rows():
    logits = torch.zeros(4, 5000, device=DEV)
    logits[0, [4500, 17, 4200]] = 3.0  # tie across blocks -> lowest index
    logits[1, :] = float("-inf")
    logits[2, [10, 4800]] = float("nan")
    logits[3, [4097, 4098]] = float("inf")
    assert argmax(logits).tolist() == [17, 0, 10, 4097]
    full = rand(2, 3, 700)
    last = full[:, -1, :]  # row stride 3*700
    assert torch.equal(argmax(last), torch.argmax(last, dim=-1))


# ----------------------------------------------------------------------------- sampling
SAMPLE_PARAMS = [
    (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1),
    (0.8, 20, 0.9, 0.05), (1.0, 3, 0.5, 0.0), (2.0, 0, 0.95, 0.2), (1.0, 1000, 0.3, 0.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,top_k,top_p,min_p", SAMPLE_PARAMS)
def test_filtered_probs_match_ref(dtype, temperature, top_k, top_p, min_p):
    logits = (rand(3, 257) * 3).to(dtype)
    got = filtered_probs(logits, temperature, top_k, top_p, min_p)
    ref = sample_ref(logits, temperature, top_k, top_p, min_p)
    assert torch.equal(got > 0, ref > 0), "different surviving token sets"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", SAMPLE_PARAMS[1:6])
def test_sample_ref_matches_transformers_warpers(temperature, top_k, top_p, min_p):
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = rand(2, 300).cpu() * 3
    scores = lp.TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = lp.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = lp.TopPLogitsWarper(top_p)(None, scores)
    if min_p > 0.0:
        scores = lp.MinPLogitsWarper(min_p)(None, scores)
    ref = sample_ref(logits, temperature, top_k, top_p, min_p)
    torch.testing.assert_close(ref, torch.softmax(scores, -1), rtol=1e-6, atol=1e-7)


def test_top_k_keeps_ties_beyond_window():
    logits = torch.zeros(2, 400, device=DEV)
    logits[0, 5] = 1.0  # row 0: top_k=3 -> token 5 plus 399 zeros tied at the 3rd value
    logits[1, :10] = torch.arange(10, 0, -1, device=DEV).float()
    got = filtered_probs(logits, 1.0, 3, 1.0, 0.0)
    ref = sample_ref(logits, 1.0, 3, 1.0, 0.0)
    assert int((ref[0] > 0).sum()) == 400 and int((ref[1] > 0).sum()) == 3
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_sample_top_k_1_is_argmax_and_seeded_reproducible():
    logits = rand(4, 1000, dtype=torch.bfloat16, seed=11)
    logits[:, 0] = logits.float().amax(-1).to(torch.bfloat16) + 1  # unique maximum
    assert torch.equal(sample(logits, 0.9, 1, 1.0, 0.0), argmax(logits))
    draws = [sample(logits, 1.0, 0, 0.9, 0.0, torch.Generator(DEV).manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and draws[0].dtype == torch.int64


def test_sample_empirical_frequencies():
    n = 20000
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -6.0]], device=DEV).expand(n, 8)
    probs = sample_ref(logits[:1], 0.8, 6, 0.9, 0.05)[0]
    tokens = sample(logits, 0.8, 6, 0.9, 0.05, torch.Generator(DEV).manual_seed(123))
    freq = torch.bincount(tokens, minlength=8).float() / n
    assert not freq[probs == 0].any(), "sampled a filtered-out token"
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.015)


def test_sample_bad_inputs():
    logits = rand(2, 10)
    for kwargs in ({"temperature": 0.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1}):
        args = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0} | kwargs
        with pytest.raises(ValueError):
            sample(logits, **args)
    with pytest.raises(ValueError, match="2-D"):
        sample(logits[0], 1.0, 0, 1.0, 0.0)
    with pytest.raises(ValueError, match="dtype"):
        argmax(logits.to(torch.int32))



@cuda_only
@pytest.mark.parametrize("vocab", [128256, 152064])
def test_real_shapes_sampling(vocab):
    logits = rand(8, vocab, dtype=torch.bfloat16)
    assert torch.equal(argmax(logits), torch.argmax(logits, dim=-1))
    assert sample(logits, 0.7, 0, 0.95, 0.0).shape == (8,)
    # bf16 logits tie a lot, and HF's top_p cut among tied tokens depends on sort order: compare
    # the filtering exactly on tie-free fp32 logits only.
    logits = rand(8, vocab, seed=3) * 4
    for params in ((0.7, 50, 0.9, 0.05), (1.0, 0, 0.9, 0.0), (1.0, 0, 1.0, 0.02)):
        got, ref = filtered_probs(logits, *params), sample_ref(logits, *params)
        assert torch.equal(got > 0, ref > 0)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)

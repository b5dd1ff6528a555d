"""CPU tests for engine/sampling.py: parameter checks, greedy, repetition penalty, top-k / top-p /
min-p filtering against transformers' logits processors, the Triton filter, seeded sampling."""

from __future__ import annotations

import pytest
import torch

from engine.sampling import Sampler, SamplingParams, apply_repetition_penalty, filtered_probs

PARAM_SETS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=10, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=0.5, min_p=0.1),
    SamplingParams(temperature=1.0, top_k=3, top_p=0.5, min_p=0.2),
    SamplingParams(temperature=2.0, top_k=1000, top_p=0.3),
]


def test_invalid_params() -> None:
    for kwargs, msg in [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                        ({"top_p": 1.5}, "top_p"), ({"min_p": 1.0}, "min_p"), ({"min_p": -0.1}, "min_p"),
                        ({"top_k": -1}, "top_k"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
                        ({"temperature": float("nan")}, "temperature")]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kwargs)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Sampler(SamplingParams(), 100, "cpu")(logits), logits.argmax(-1))
    padded = torch.cat([logits, torch.full((4, 7), 100.0)], dim=1)  # padded vocab columns are never chosen
    out = Sampler(SamplingParams(), 100, "cpu", use_triton=True)(padded)
    assert out.dtype == torch.int64 and torch.equal(out, logits.argmax(-1))


def test_repetition_penalty_matches_transformers() -> None:
    lp = pytest.importorskip("transformers.generation.logits_process", reason="transformers logits_process missing")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g) * 3
    rows = [[1, 2, 3, 2, 49], [4], [7, 8, 0, 0, 0, 9]]
    history = torch.full((3, 6), -1, dtype=torch.int64)
    for r, ids in enumerate(rows):
        history[r, : len(ids)] = torch.tensor(ids)
    for penalty in (1.3, 0.7):
        ours = apply_repetition_penalty(logits.clone(), history, penalty)
        proc = lp.RepetitionPenaltyLogitsProcessor(penalty=penalty)
        for r, ids in enumerate(rows):
            ref = proc(torch.tensor([ids]), logits[r : r + 1].clone())
            torch.testing.assert_close(ours[r : r + 1], ref, rtol=0, atol=0)
        assert torch.equal(ours[1, 49], logits[1, 49])  # -1 padding must not touch the last column


def test_batch_history_padding_greedy() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 9] = 5.0
    logits[:, 3] = 4.0
    history = torch.tensor([[9, 1, 2], [5, -1, -1]])
    out = Sampler(SamplingParams(repetition_penalty=2.0), 10, "cpu")(logits, history)
    assert out.tolist() == [3, 9]


def _hf_filtered(lp: object, logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    warpers = [lp.TemperatureLogitsWarper(p.temperature)]
    if p.top_k > 0:
        warpers.append(lp.TopKLogitsWarper(top_k=p.top_k))
    if p.top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(top_p=p.top_p))
    if p.min_p > 0.0:
        warpers.append(lp.MinPLogitsWarper(min_p=p.min_p))
    scores = logits.clone()
    for w in warpers:
        scores = w(None, scores)
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("params", PARAM_SETS, ids=str)
def test_filtered_probs_match_transformers(params: SamplingParams) -> None:
    lp = pytest.importorskip("transformers.generation.logits_process", reason="transformers logits_process missing")
    logits = torch.randn(5, 200, generator=torch.Generator().manual_seed(params.top_k)) * 2
    torch.testing.assert_close(filtered_probs(logits, params), _hf_filtered(lp, logits, params),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("params", PARAM_SETS[:4], ids=str)
def test_triton_filtered_probs_agree(params: SamplingParams) -> None:
    ks = pytest.importorskip("kernels.sampling", reason="kernels.sampling (Triton) not importable")
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(3))
    got = ks.filtered_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    torch.testing.assert_close(got, filtered_probs(logits, params), rtol=0, atol=1e-5)


def test_seeded_sampling_reproducible() -> None:
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    runs = []
    for _ in range(2):
        sampler = Sampler(params, 64, "cpu")
        runs.append(torch.stack([sampler(logits) for _ in range(20)]))
    assert torch.equal(runs[0], runs[1])
    other = Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=99), 64, "cpu")
    assert not torch.equal(runs[0], torch.stack([other(logits) for _ in range(20)]))


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=0),
                                    SamplingParams(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05, seed=1)],
                         ids=str)
def test_empirical_frequencies(params: SamplingParams) -> None:
    n = 20_000
    base = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.8]])
    draws = Sampler(params, 8, "cpu")(base.expand(n, 8).contiguous())
    freq = torch.bincount(draws, minlength=8).float() / n
    expected = filtered_probs(base, params)[0]
    assert (freq - expected).abs().max().item() < 0.02
    assert freq[expected == 0].sum().item() == 0.0


def test_draw_gives_broken_rows_their_first_column_and_leaves_the_rest_alone():
    """kernels.draw: NaN, inf, negative or massless rows (non-finite logits) draw column 0 instead of
    tripping multinomial (a device-side assert on CUDA); good rows draw as torch.multinomial does."""
    from kernels.draw import draw

    good = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.5, 0.0]])
    nan, inf = float("nan"), float("inf")
    broken = torch.tensor([[nan, 0.5, 0.5], [0.2, inf, 0.1], [0.0, 0.0, 0.0], [-0.1, 0.6, 0.5]])
    probs = torch.cat([good, broken, good])
    got = draw(probs, torch.Generator().manual_seed(5)).flatten().tolist()
    assert got[2:6] == [0, 0, 0, 0]
    want = torch.multinomial(torch.cat([good, torch.eye(3)[:1].expand(4, 3), good]), 1,
                             generator=torch.Generator().manual_seed(5)).flatten().tolist()
    assert got == want
    with pytest.raises(RuntimeError):
        torch.multinomial(broken[:1], 1)  # what draw saves the caller from


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 10**30])
def test_seed_outside_64_bits_is_refused(seed) -> None:
    with pytest.raises(ValueError, match="seed must fit 64 bits"):
        SamplingParams(temperature=1.0, seed=seed)


def test_the_nth_completions_seed_wraps_to_the_same_generator_state() -> None:
    """Completion i of a request uses seed + i wrapped to 64 bits; torch seeds a negative seed as its
    two's complement, so wrapping changes no draw."""
    from engine.serving.params import SamplingParams as RequestParams

    params = RequestParams(temperature=1.0, seed=2**64 - 1, n=3)
    assert [params.token_params(i).seed for i in range(3)] == [2**64 - 1, 0, 1]
    logits = torch.randn(1, 50)

    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), 50, "cpu")
        return [int(sampler(logits)) for _ in range(8)]
    assert draws(-3) == draws(2**64 - 3)
    assert draws(RequestParams(temperature=1.0, seed=-4, n=2).token_params(1).seed) == draws(-3)


def test_seeds_differing_above_bit_31_draw_differently_on_the_cpu() -> None:
    """The CPU generator keeps 32 bits of its seed: the high half is mixed in (engine.sampling.generator_seed), so
    seeds that differ only there no longer give the same tokens; seeds below 2**32 seed the generator as before."""
    logits = torch.zeros(1, 1000)  # uniform: 12 draws of 1000 tokens tell streams apart

    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), 1000, "cpu")
        return [int(sampler(logits)) for _ in range(12)]
    seeds = [5, 5 + 2**32, 5 + 2**40, 5 + 2**63, 2**32 - 1, -1]
    streams = [draws(s) for s in seeds]
    assert len({tuple(s) for s in streams}) == len(seeds), dict(zip(seeds, streams))
    assert draws(-7) == draws(2**64 - 7)  # a negative seed is still its two's complement
    from engine.sampling import generator_seed
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [generator_seed(s, cpu) for s in (0, 5, 2**32 - 1)] == [0, 5, 2**32 - 1]
    assert generator_seed(5 + 2**40, cuda) == 5 + 2**40 and generator_seed(-1, cuda) == 2**64 - 1
    expected = torch.multinomial(torch.ones(1000), 1, generator=torch.Generator().manual_seed(5)).item()
    assert streams[0][0] == expected

"""``--seed`` with several prompts (engine.sampling.row_seeds): a prompt's sampled tokens are those it gets alone,
whatever else is in the invocation, its place among the prompts, or how they are grouped into batches; a copy of a
prompt gets ``seed + 1`` (the server's seeding of a request's ``n`` completions). Tiny model on the CPU."""

from __future__ import annotations

import pytest

from engine.engine import Engine, EngineOptions
from engine.generate import generate
from engine.sampling import SamplingParams, row_seeds
from tests.test_cli import CPU, run_json

A, B = "the cat sat", "a dog ran"


@pytest.fixture
def tokens(capsys, tiny_qwen2_dir):
    """argv's extra flags and prompts -> each prompt's 8 tokens sampled (temperature 1, top-k 3)."""
    base = ["--model", str(tiny_qwen2_dir), "--no-chat", "--max-new-tokens", "8", "--temperature", "1.0",
            "--top-k", "3", *CPU]

    def run(*prompts: str, seed: int = 7, flags: tuple[str, ...] = ()) -> list[list[int]]:
        obj, _ = run_json(capsys, [*base, "--seed", str(seed), *flags, *(a for p in prompts for a in ("--prompt", p))])
        return [r["token_ids"] for r in obj.get("results", [obj])]
    return run


def test_a_prompts_tokens_do_not_depend_on_the_batch(tokens):
    (a,), (b,), (a8,) = tokens(A), tokens(B), tokens(A, seed=8)
    assert len({tuple(a), tuple(b), tuple(a8)}) == 3  # the prompt and the seed both matter
    assert tokens(B, A) == [b, a]  # before: row 1 drew after row 0 from one generator; A's tokens changed
    assert tokens(A, B, A) == [a, b, a8]  # the second copy of A: seed + 1
    assert tokens(A, B, A, flags=("--batch", "2")) == [a, b, a8]  # two groups: no group starts the seed again
    assert tokens(A, flags=("--batch", "2")) == [a, a8]  # one prompt decoded twice: two different replies


def test_row_seeds_count_copies_and_wrap_to_64_bits():
    assert row_seeds([[1], [2], [1], [1, 2], [1]], 5) == [5, 5, 6, 5, 7]
    assert row_seeds([[3], [3], [3]], 2**64 - 1) == [2**64 - 1, 0, 1]
    assert row_seeds([[3], [3]], -1) == [-1, 0]  # torch seeds -1 as 2**64 - 1


def test_generate_seeds_each_row(tiny_qwen2_dir):
    """engine.generate with a seeded SamplingParams: each row as it is alone; ``seeds`` names each row's."""
    eng = Engine(tiny_qwen2_dir, EngineOptions(device="cpu", dtype="fp32", kernels="torch", max_context=64, batch=3))
    params = SamplingParams(temperature=1.0, top_k=3, seed=11)
    prompts = [[5, 6, 7], [9, 8], [5, 6, 7]]
    try:
        alone = [generate(eng, [p], params, max_new_tokens=6).token_ids[0] for p in prompts[:2]]
        twelve = generate(eng, [prompts[0]], SamplingParams(temperature=1.0, top_k=3, seed=12), max_new_tokens=6)
        assert generate(eng, prompts, params, max_new_tokens=6).token_ids == [*alone, twelve.token_ids[0]]
        given = generate(eng, prompts[:2], params, max_new_tokens=6, seeds=[12, 11]).token_ids
        assert given == [twelve.token_ids[0], alone[1]]
        with pytest.raises(ValueError, match="got 1 seeds for 2 prompts"):
            generate(eng, prompts[:2], params, max_new_tokens=6, seeds=[1])
    finally:
        eng.close()

"""A streamed server pass's size (engine/serving/passcost.py) and the order prompts take its room in
(engine/serving/runner.py): about two weight streams' time of prompt tokens at their measured cost or the
shorter half of the waiting prompts, fewest tokens left first, a prompt passed over or cut short whole in
the next pass.
CPU, fp32, the tiny model; every sequence still gets its own greedy tokens."""

from __future__ import annotations

import pytest

from engine.serving import passcost
from engine.serving.params import SamplingParams
from engine.serving.passcost import PassCost
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from tests.helpers import make_engine, random_prompts
from tests.test_serving_pass_tokens import streamed_budget  # noqa: F401 - a fixture, used by name
from tests.test_serving_scheduler import alone, engines  # noqa: F401 - a fixture, used by name


def test_budget_is_the_floor_until_both_costs_are_known():
    """Unknown costs: the budget is the floor, so a burst's room is its shorter half (two passes)."""
    cost = PassCost()
    assert cost.budget(8, 1000) == 8 and cost.budget(8, 5) == 5
    assert cost.room([1000, 300, 500], 8, 10_000) == 800  # the shorter half and the median prompt
    assert cost.room([5, 1, 4, 2, 3, 6], 8, 10_000) == 10  # six prompts: the four shortest
    assert cost.room([5, 1, 4, 2, 3, 6], 12, 10_000) == 12  # the budget, when more
    assert cost.room([700], 8, 10_000) == 700  # a lone prompt whole
    cost.observe(0, 0.25)  # a decode-only pass: the stream's time
    assert cost.budget(8, 1000) == 8
    cost.observe(passcost.MIN_PROMPT_TOKENS - 1, 0.3)  # too few prompt tokens to price one
    assert cost.token_s is None and cost.budget(8, 1000) == 8


@pytest.mark.parametrize("stream_s, token_s, floor, cap, want", [
    (0.25, 1e-4, 8, 100_000, 5000),  # two streams' time: 0.5 s / 0.1 ms
    (0.25, 1e-4, 8, 3000, 3000),  # the plan's prompt-state reserve caps it
    (0.25, 1e-1, 64, 100_000, 64),  # never below one prefill chunk
])
def test_budget_is_two_streams_of_prompt_tokens(stream_s, token_s, floor, cap, want):
    cost = PassCost()
    cost.observe(0, stream_s)
    cost.observe(10_000, token_s * 10_000)
    assert cost.budget(floor, cap) == want
    cost.reset()
    assert cost.stream_s is None and cost.token_s is None and cost.budget(floor, cap) == min(floor, cap)


def test_a_pass_bound_by_the_stream_only_lowers_the_cost_per_token():
    """A pass with prompts that took less than ``BOUND`` streams hid its tokens under the stream: its
    time / tokens is an upper bound of the cost per token, kept only where it is lower than what is known;
    a pass bound by its tokens replaces it."""
    cost = PassCost()
    cost.observe(0, 0.25)
    cost.observe(2000, 0.3)  # bound by the stream, nothing known yet: 150 us a token at most
    assert cost.token_s == pytest.approx(1.5e-4) and cost.budget(8, 10**6) == 3333
    cost.observe(10_000, 1.0)  # bound by its tokens: 100 us a token
    assert cost.budget(8, 10**6) == 5000
    cost.observe(5000, 0.3)  # bound by the stream, at most 60 us: lower, kept
    assert cost.token_s == pytest.approx(6e-5)
    cost.observe(1000, 0.26)  # bound by the stream, at most 260 us: higher, ignored
    assert cost.token_s == pytest.approx(6e-5)
    cost.observe(12_000, 0.9)  # bound by its tokens: 75 us, replaces the bound
    assert cost.token_s == pytest.approx(7.5e-5)


@pytest.mark.parametrize("intercept_s, per_token_s, first", [(0.03, 5e-5, 512), (0.03, 5e-5, 200_000),
                                                               (0.0, 2e-5, 1024), (0.1, 1e-4, 64)])
def test_learned_budget_settles_at_two_streams_from_above_or_below(intercept_s, per_token_s, first):
    """Passes that cost max(stream, intercept + tokens x per-token): from a pass far too small (bound by the
    stream: each next one at least ``STREAMS / BOUND`` times larger) or far too large the budget settles
    where a pass takes about two streams' time, within ten passes."""
    stream_s = 0.25
    cost, tokens = PassCost(), first

    def took(n: int) -> float:
        return max(stream_s, intercept_s + n * per_token_s)

    for _ in range(10):
        cost.observe(0, stream_s)
        cost.observe(tokens, took(tokens))
        tokens = cost.budget(64, 10**6)
    assert 1.8 * stream_s <= took(tokens) <= 2.1 * stream_s, (tokens, took(tokens))


class FixedBudget(PassCost):
    """A pass cost whose budget is fixed (the runner's order is what these tests check); with
    ``fixed_room`` the pass's room is that budget too, whatever waits."""

    def __init__(self, tokens: int, fixed_room: bool = False) -> None:
        super().__init__()
        self.tokens, self.fixed_room = tokens, fixed_room
        self.observed: list[int] = []

    def room(self, prompts: list[int], floor: int, cap: int) -> int:
        return self.tokens if self.fixed_room else super().room(prompts, floor, cap)

    def observe(self, prompt_tokens: int, seconds: float) -> None:
        self.observed.append(prompt_tokens)

    def budget(self, floor: int, cap: int) -> int:
        return self.tokens

    def reset(self) -> None:
        self.observed.clear()


def _streamed(tiny_qwen2_dir, budget: int, kv: str):
    eng = make_engine(tiny_qwen2_dir, batch=4, max_context=64, prefill_chunk=8, vram_budget=budget)
    assert eng.plan.num_slots > 0 and eng.plan.streamed_layers, "the budget must stream layers"
    sched = Scheduler(eng) if kv == "slots" else Scheduler(eng, kv_cache="paged", block_size=int(kv[6:]))
    assert isinstance(sched.runner.cost, PassCost)
    return eng, sched


@pytest.mark.parametrize("kv", ["slots", "paged-4"])
def test_a_pass_feeds_the_fewest_tokens_left_first_and_the_rest_next(engines, tiny_qwen2_dir,  # noqa: F811
                                                                      streamed_budget, kv):  # noqa: F811
    """Room 20 tokens, prompts of 30, 3, 17 and 9 tokens: pass 1 feeds the fewest first: 3 and 9 (first
    tokens) and 8 of 17, cut short, and passes the 30 over; pass 2 (two decode rows, room 20) feeds both
    whole, the 30 and the cut prompt's other 9. Each gets its own greedy tokens."""
    single, _ = engines
    eng, sched = _streamed(tiny_qwen2_dir, streamed_budget, kv)
    try:
        sched.runner.cost = fixed = FixedBudget(20, fixed_room=True)
        prompts = random_prompts([30, 3, 17, 9], eng.cfg.vocab_size, seed=53)
        seqs = [Sequence(p, SamplingParams(max_tokens=6), eng.tokenizer) for p in prompts]
        for s in seqs:
            sched.add(s)
        firsts = []
        for _ in range(2):
            sched.step()
            firsts.append([len(s.output_ids) > 0 for s in seqs])
        assert firsts == [[False, True, False, True], [True, True, True, True]]
        assert fixed.observed == [20, 39]  # prompt tokens of each timed pass
        while sched.has_work():
            sched.step()
        for p, s in zip(prompts, seqs):
            assert s.output_ids == alone(single, p, 6), f"prompt of {len(p)} tokens"
    finally:
        eng.close()


def test_prompts_passed_over_or_cut_short_go_whole_in_the_next_pass(engines, tiny_qwen2_dir,  # noqa: F811
                                                                     streamed_budget):  # noqa: F811
    """Prompts of 10, 20, 10 and 20 tokens, room 30: pass 1 feeds both 10s and 10 of the first 20, cut
    short, and passes the second 20 over; pass 2's room is 20, yet both go whole."""
    single, _ = engines
    eng, sched = _streamed(tiny_qwen2_dir, streamed_budget, "slots")
    try:
        sched.runner.cost = fixed = FixedBudget(30, fixed_room=True)
        prompts = random_prompts([10, 20, 10, 20], eng.cfg.vocab_size, seed=54)
        seqs = [Sequence(p, SamplingParams(max_tokens=3), eng.tokenizer) for p in prompts]
        for s in seqs:
            sched.add(s)
        sched.step()
        assert [s.num_computed for s in seqs] == [10, 10, 10, 0] and [s.deferred for s in seqs] == [0, 1, 0, 1]
        fixed.tokens = 20
        sched.step()
        assert sched.stats.last_tokens == 2 + 10 + 20 and all(s.output_ids for s in seqs)
        assert [s.deferred for s in seqs] == [0, 0, 0, 0]
        while sched.has_work():
            sched.step()
        for p, s in zip(prompts, seqs):
            assert s.output_ids == alone(single, p, 3)
    finally:
        eng.close()


def test_a_lone_prompt_is_never_cut(engines, tiny_qwen2_dir, streamed_budget):  # noqa: F811
    """Whatever the learned budget, a pass takes the shortest waiting prompt whole: one client's prompt
    never pays for two streams."""
    eng, sched = _streamed(tiny_qwen2_dir, streamed_budget, "slots")
    try:
        sched.runner.cost = FixedBudget(8)
        seq = Sequence(random_prompts([40], eng.cfg.vocab_size, seed=57)[0], SamplingParams(max_tokens=2),
                       eng.tokenizer)
        sched.add(seq)
        sched.step()
        assert seq.num_computed == 40 and len(seq.output_ids) == 1
    finally:
        eng.close()


def test_all_resident_a_prompt_passed_over_four_times_goes_first(engines):  # noqa: F811
    _, multi = engines
    short, long_ = (Sequence([1] * n, SamplingParams(), multi.tokenizer) for n in (3, 30))
    assert sorted([long_, short], key=lambda s: passcost.prompt_order(passcost.MAX_DEFERRED, s)) == [short, long_]
    long_.deferred = passcost.MAX_DEFERRED
    assert sorted([short, long_], key=lambda s: passcost.prompt_order(passcost.MAX_DEFERRED, s)) == [long_, short]


def test_the_runner_learns_its_pass_cost_and_forgets_it_on_reset(engines, tiny_qwen2_dir,  # noqa: F811
                                                                 streamed_budget, monkeypatch):  # noqa: F811
    """Timed passes teach the runner both figures (a decode-only pass, a pass with prompts); the budget
    then bounds the next passes' prompt tokens; a reset (after the warm-up's passes) forgets them."""
    monkeypatch.setattr(passcost, "MIN_PROMPT_TOKENS", 1)
    eng, sched = _streamed(tiny_qwen2_dir, streamed_budget, "slots")
    try:
        cost = sched.runner.cost
        prompts = random_prompts([20, 12], eng.cfg.vocab_size, seed=55)
        for p in prompts:
            sched.add(Sequence(p, SamplingParams(max_tokens=3), eng.tokenizer))
        sched.step()  # nothing known: the shorter half and the median prompt (of two: both)
        assert sched.stats.last_tokens == 32 and cost.token_s > 0 and cost.stream_s is None
        sched.step()
        assert cost.stream_s > 0
        while sched.has_work():
            sched.step()
        want = cost.budget(8, sched.runner.pass_tokens)
        assert 8 <= want <= sched.runner.pass_tokens
        cost.budget = lambda floor, cap: 9  # what the learned figures give, fixed for the check
        for p in random_prompts([25, 25, 20], eng.cfg.vocab_size, seed=56):
            sched.add(Sequence(p, SamplingParams(max_tokens=2), eng.tokenizer))
        sched.step()
        assert sched.stats.last_tokens == 45  # the two shortest of three, 20 + 25: more than the budget of 9
        cost.budget = lambda floor, cap: 60
        sched.step()  # two decode rows, the 25 passed over
        assert sched.stats.last_tokens == 2 + 25
        sched.runner.reset()
        assert cost.stream_s is None and cost.token_s is None
    finally:
        eng.close()


def test_all_resident_passes_keep_one_chunk_and_learn_nothing(engines):  # noqa: F811
    _, multi = engines
    assert Scheduler(multi).runner.cost is None


def test_room_is_the_budget_the_shorter_half_or_the_shortest_prompt():
    cost = PassCost()
    cost.observe(0, 0.25)
    cost.observe(10_000, 1.0)  # budget 5000 tokens
    assert cost.room([100, 200], 8, 10**6) == 5000
    assert cost.room([7000, 8000, 101], 8, 10**6) == 7101  # the two shortest of three
    assert cost.room([9000, 10, 20, 30, 40], 8, 10**6) == 5000  # the three shortest, 60: the budget
    assert cost.room([9000], 8, 10**6) == 9000  # a lone prompt whole
    assert cost.room([], 8, 10**6) == 5000

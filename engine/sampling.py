"""Next-token selection on the device: repetition penalty, greedy or filtered random sampling.

The torch code here is the reference and follows Hugging Face transformers exactly:
RepetitionPenaltyLogitsProcessor, then TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper and MinPLogitsWarper (min_tokens_to_keep=1), then a multinomial draw.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.draw import draw

logger = logging.getLogger(__name__)

_NEG_INF = float("-inf")
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1  # torch's generators take a 64-bit seed (a negative one as two's complement)


GREEDY_BELOW = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters. ``temperature`` 0 (or below 1e-5) means greedy; 0 / 1.0 / 0.0 disable top-k / top-p /
    min-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables top-k), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1.0 disables top-p), got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1) (0 disables min-p), got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must fit 64 bits (from -2**63 to 2**64 - 1), got {self.seed}")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax: temperature 0, or below ``GREEDY_BELOW`` (dividing the logits by
        1e-38 overflowed them to inf, and the draw then took token 0)."""
        return self.temperature < GREEDY_BELOW


def row_seeds(prompts: list[list[int]], seed: int) -> list[int]:
    """Each prompt's seed in a batch sampled with ``seed``: ``seed + k`` (wrapped to 64 bits) for the k-th earlier
    copy of the same prompt, as the server seeds a request's ``n`` completions, so a prompt's tokens depend on
    neither the other prompts nor its place among them (copies still get their own draws)."""
    seen: dict[tuple[int, ...], int] = {}
    out = []
    for p in prompts:
        k = seen.get(tuple(p), 0)
        seen[tuple(p)] = k + 1
        out.append((seed + k) % (SEED_MAX + 1) if k else seed)
    return out


def generator_seed(seed: int, device: torch.device) -> int:
    """The value a ``device`` generator is seeded with for a request's 64-bit ``seed``.

    CUDA's Philox generator keeps all 64 bits. The CPU generator's Mersenne Twister keeps only the low 32 (seeds
    differing above bit 31 gave the same tokens), so there the high half is mixed into the low half first:
    ``lo ^ fmix32(hi)`` (MurmurHash3's bijective finaliser, 0 for 0): seeds below 2**32 are kept as they are, and
    seeds differing only above bit 31 always seed different streams. A negative seed is its two's complement.
    """
    seed %= 2**64
    if device.type != "cpu":
        return seed
    h = seed >> 32
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    return (seed & 0xFFFFFFFF) ^ h ^ (h >> 16)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF RepetitionPenaltyLogitsProcessor on [B, V] logits; ``history`` [B, N] right-padded with -1.

    Returns a new tensor. Ids outside [0, V) (padding, or ids beyond the logits width) are ignored.
    """
    if penalty == 1.0 or history is None or history.numel() == 0:
        return logits
    vocab = logits.shape[-1]
    if history.dim() == 1:
        history = history.unsqueeze(0)
    # Padding and out-of-range ids all go to an extra column that is dropped afterwards (as HF does).
    ids = torch.where((history >= 0) & (history < vocab), history, vocab).to(torch.int64)
    scores = F.pad(logits, (0, 1))
    picked = torch.gather(scores, 1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, ids, picked)[..., :vocab]


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p in HF order; removed tokens are -inf. ``temperature`` must be > 0."""
    scores = logits.float() / params.temperature
    vocab = scores.shape[-1]
    if params.top_k > 0:
        k = min(params.top_k, vocab)
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, _NEG_INF)
    if params.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative <= (1 - params.top_p)
        sorted_remove[..., -1:] = False  # keep at least one token
        remove = sorted_remove.scatter(1, sorted_idx, sorted_remove)
        scores = scores.masked_fill(remove, _NEG_INF)
    if params.min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < params.min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
        scores = scores.masked_fill(remove, _NEG_INF)
    return scores


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The fp32 [B, V] distribution a token is drawn from (one-hot of the argmax when greedy).

    The repetition penalty is not included: apply :func:`apply_repetition_penalty` first.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [B, V], got shape {tuple(logits.shape)}")
    if params.greedy:
        out = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        return out.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.softmax(warp_logits(logits, params), dim=-1)


class Sampler:
    """Picks the next token per row of logits, entirely on the logits' device.

    ``vocab_size`` is the number of real logit columns: wider (padded) logits are cut to it.
    With ``use_triton`` and CUDA logits the Triton kernels in ``kernels.sampling`` are used;
    otherwise the torch reference implementation in this module.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device | str,
                 use_triton: bool = False) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
        self.params = params
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.use_triton = use_triton
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The per-device generator, seeded with ``params.seed`` (or randomly) on first use."""
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self.params.seed is None:
                gen.seed()
            else:
                gen.manual_seed(generator_seed(self.params.seed, device))
            self._generators[device] = gen
        return gen

    def _check(self, logits: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        if logits.dim() != 2:
            raise ValueError(f"Sampler: logits must be 2-D [B, V], got shape {tuple(logits.shape)}")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"Sampler: logits have {logits.shape[1]} columns but vocab_size is {self.vocab_size}; "
                             "pass the model's vocab size")
        if history is not None and history.numel() and history.shape[0] != logits.shape[0]:
            raise ValueError(f"Sampler: history batch {history.shape[0]} != logits batch {logits.shape[0]}")
        return logits[:, :self.vocab_size] if logits.shape[1] > self.vocab_size else logits

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """Next token ids int64 [B] on the logits' device; ``history`` [B, N] is prompt + generated, -1 padded."""
        logits = self._check(logits, history)
        p = self.params
        if p.repetition_penalty != 1.0 and history is not None:
            logits = apply_repetition_penalty(logits.float(), history, p.repetition_penalty)
        if self.use_triton and logits.is_cuda:
            from kernels.sampling import argmax, sample  # lazy: Triton is optional

            if p.greedy:
                return argmax(logits)
            return sample(logits, p.temperature, p.top_k, p.top_p, p.min_p, self.generator(logits.device))
        if p.greedy:
            return logits.argmax(dim=-1)
        probs = filtered_probs(logits, p)
        return draw(probs, self.generator(logits.device)).squeeze(1)

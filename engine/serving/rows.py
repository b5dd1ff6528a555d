"""A step's tokens from its logits: each sequence's row (by slot), sampled with the sequence's own parameters,
and the log-probabilities it asks for (the OpenAI API's ``logprobs``)."""

from __future__ import annotations

import functools

import torch

from engine.sampling import Sampler, apply_repetition_penalty
from engine.serving.constrain import constrained_token
from engine.serving.sequence import Logprob, Sequence
from engine.upload import upload_list


class RowSampler:
    """Samples rows of a pass's logits; unseeded parameter sets share one :class:`Sampler` each."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.vocab = engine.cfg.vocab_size
        self.samplers: dict[object, Sampler] = {}  # unseeded parameter sets -> one shared sampler each

    def logprob(self, logits: torch.Tensor, s: Sequence, token: int) -> Logprob | None:
        """The token's log-probability under the model's raw logits, with the top ``params.logprobs``."""
        k = s.params.logprobs
        if k is None:
            return None
        lp = torch.log_softmax(logits[s.slot, : self.vocab].float(), dim=-1)
        top = torch.topk(lp, k) if k else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return Logprob(token, float(lp[token]), pairs)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Next token of each sequence from its row (by slot) of ``logits`` [rows, V], with its own parameters.

        Greedy rows share one argmax, over every row (no row index to upload); unseeded rows without penalties
        share one draw per parameter set (one host sync each); seeded or penalised rows draw alone, from their
        own generator and history.
        """
        out: dict[int, int] = {}
        groups: dict[object, list[Sequence]] = {}
        for s in seqs:  # rows held to a format draw alone (engine.serving.constrain)
            if not s.params.penalised and s.constraint is None and (s.token_params.greedy or
                                                                    s.token_params.seed is None):
                groups.setdefault("greedy" if s.token_params.greedy else s.token_params, []).append(s)
        for key, group in groups.items():
            if key == "greedy":
                best = logits[:, : self.vocab].argmax(-1).tolist()
                out.update((s.seq_id, best[s.slot]) for s in group)
                continue
            rows = logits[upload_list([s.slot for s in group], torch.long, logits.device), : self.vocab]
            out.update(zip((s.seq_id for s in group), self._shared(key)(rows).tolist()))
        for s in seqs:
            if s.seq_id not in out:
                out[s.seq_id] = self._sample_one(logits[s.slot: s.slot + 1], s)
        return [out[s.seq_id] for s in seqs]

    def _shared(self, params) -> Sampler:
        sampler = self.samplers.get(params)
        if sampler is None:
            eng = self.engine
            sampler = self.samplers[params] = Sampler(params, self.vocab, eng.device,
                                                       use_triton=eng.ops.name == "triton")
        return sampler

    def _sample_one(self, row: torch.Tensor, s: Sequence) -> int:
        eng = self.engine
        if s.sampler is None:
            s.sampler = Sampler(s.token_params, self.vocab, eng.device, use_triton=eng.ops.name == "triton")
        row = self._penalised(row[:, : self.vocab].float(), s)
        token = int(s.sampler(row))
        if s.constraint is not None:  # a format (JSON, a schema, a call): redrawn among the tokens it allows
            eos = eng.tokenizer.eos_ids | set(s.params.stop_token_ids or ())  # what may end a closed format
            token = constrained_token(row[0], token, s.constraint, eos, s.token_params,
                                      s.sampler.generator(row.device))
            s.constraint.advance(token, eos)
        return token

    def _penalised(self, row: torch.Tensor, s: Sequence) -> torch.Tensor:
        """Sequence ``s``'s fp32 row [1, V] with its presence / frequency penalties, logit bias and repetition
        penalty (over its prompt and output ids)."""
        p = s.params
        if (p.presence_penalty or p.frequency_penalty) and s.output_ids:
            counts = torch.bincount(upload_list(s.output_ids, torch.long, row.device), minlength=self.vocab)
            counts = counts[: self.vocab].to(row.dtype)
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
        if p.logit_bias:  # OpenAI's: added to the logits before sampling (ids past the vocabulary refused earlier)
            ids, bias = _bias_tensors(p.logit_bias, row.device)
            row = row.index_add(1, ids, bias)  # out of place: row may be a view of the batch's logits
        if p.repetition_penalty != 1.0:  # here, not in the sampler: a format's fallback draw sees it too
            history = upload_list(s.all_ids, torch.long, row.device).view(1, -1)
            row = apply_repetition_penalty(row, history, p.repetition_penalty)
        return row


@functools.lru_cache(maxsize=64)
def _bias_tensors(logit_bias: tuple[tuple[int, float], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's logit bias as (token ids, fp32 biases [1, n]) on ``device``, made once per bias and device
    rather than uploaded at every step of every sequence that has it."""
    ids, bias = zip(*logit_bias)
    return upload_list(list(ids), torch.long, device), torch.tensor([bias], dtype=torch.float32).to(device)

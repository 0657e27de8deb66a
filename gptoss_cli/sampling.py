"""Choosing the next token from the logits: the engine's sampler.

``sample`` is the plain case (temperature, top-p, top-k, min-p). ``Sampler`` is one generation's
sampler: it adds what depends on the tokens so far (presence, frequency and repetition penalties),
a fixed ``logit_bias``, an optional token mask from the caller (``constraint``: the server uses it
to make the model write a tool call's header), and the log-probabilities of each chosen token.

Order, as vLLM applies them: logit bias, penalties, mask, temperature, then top-k, min-p and top-p
on the probabilities. Penalties follow OpenAI's definition (presence and frequency over the
generated tokens: ``logit - frequency * count - presence * (count > 0)``) and CTRL's for
repetition (Keskar et al. 2019, as transformers and vLLM do it: over prompt and generated tokens,
a positive logit is divided by the penalty, a negative one multiplied). Log-probabilities are of
the model's own distribution (``log_softmax`` of the raw logits, before any of the above), which is
what ``gptoss eval``'s perplexity scores.

Cost: each adjustment is one or two passes over the vocabulary, done only when asked for. Every
sampled token costs exactly one device-to-host transfer (the token id, packed with its
log-probabilities when those are wanted); nothing else waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch

NUCLEUS_TOPK = 1024     # top-p looks for its nucleus among this many tokens first (see sample)
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each token (the defaults change nothing: softmax at temperature 1)."""

    temperature: float = 1.0          # 0: greedy
    top_p: float = 1.0                # nucleus mass, in (0, 1]
    top_k: int = 0                    # only the k most likely tokens; 0: all
    min_p: float = 0.0                # drop tokens under min_p x the top probability
    presence_penalty: float = 0.0     # subtracted once from every token generated so far
    frequency_penalty: float = 0.0    # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0   # CTRL's, over prompt and generated tokens; 1: off
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    logprobs: int | None = None       # None: none; k: the chosen token's and the k most likely

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or not 0 <= self.min_p <= 1:
            raise ValueError(f"invalid sampling parameters: {self}")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be above 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be 0..{MAX_TOP_LOGPROBS}")


class TokenMask(NamedTuple):
    """What a constraint allows next: only ``ids`` (``allow``), or anything but ``ids``."""

    ids: Sequence[int]
    allow: bool


# A caller's constraint: given the tokens generated so far, the mask for the next one (or None).
Constraint = Callable[[list], "TokenMask | None"]


class Step(NamedTuple):
    """One generated token: its id and, when asked for, its log-probability and the top ones."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()      # (token id, logprob), most likely first


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
           top_k: int = 0, min_p: float = 0.0) -> int:
    """One token id from float32 logits [V]: greedy at temperature 0, else softmax(logits / T)
    restricted to the ``top_k`` most likely, to those with at least ``min_p`` times the top
    probability, and to the smallest set of tokens whose mass reaches ``top_p``.

    Drawn by inverting the cumulative distribution with one uniform number (``_draw``): on a
    CPU, ``torch.multinomial`` over the 201,088 tokens of gpt-oss takes 4-12 ms, a fifth of a
    decode step, where this takes under half a millisecond. The nucleus is searched among the
    ``NUCLEUS_TOPK`` most likely tokens first (a top-k instead of sorting the whole vocabulary:
    18 ms on a CPU); when those hold less than ``top_p`` the whole vocabulary is sorted. Both give
    the same nucleus. On a GPU the sort is cheap and checking the mass would wait for the device,
    so it always sorts."""
    return int(_choose(logits, temperature, top_p, top_k, min_p, generator))


def _choose(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, min_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    """``sample``'s choice as a 0-d tensor on the logits' device (nothing waits for it)."""
    if temperature <= 0:
        return torch.argmax(logits)
    order = None                                          # candidate i is token order[i]
    if 0 < top_k < logits.numel():
        logits, order = torch.topk(logits, top_k)         # sorted, descending
    probs = torch.softmax(logits / temperature, dim=-1)
    if min_p > 0:
        probs = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    if top_p < 1.0:
        mass = top_p if min_p == 0 else top_p * probs.sum()
        if order is not None:                             # already sorted
            top, within = probs, None
        elif probs.is_cuda:
            top, within = torch.sort(probs, descending=True)
        else:
            top, within = torch.topk(probs, min(NUCLEUS_TOPK, probs.numel()))
            if top.numel() < probs.numel() and float(top.sum()) < mass:     # on the host already
                top, within = torch.sort(probs, descending=True)
        keep = (torch.cumsum(top, 0) - top) < mass        # always keeps the first
        i = _draw_index(torch.where(keep, top, torch.zeros_like(top)), generator)
        i = within[i] if within is not None else i
    else:
        i = _draw_index(probs, generator)
    return order[i] if order is not None else i


def _draw_index(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Index i (a 0-d tensor) with probability weights[i] / weights.sum() (weights >= 0, not all
    zero): the first index whose running sum (float64) exceeds a uniform draw over the total. The
    draw is kept strictly below the total, so the index always has mass."""
    cdf = torch.cumsum(weights, 0, dtype=torch.float64)
    total = cdf[-1]
    u = torch.rand((), generator=generator, dtype=torch.float64, device=weights.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u.reshape(1), right=True)[0]


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(_draw_index(weights, generator))


class _Ids:
    """A growing list of token ids kept on the device (appending launches no transfer back)."""

    def __init__(self, ids: Sequence[int], device: torch.device):
        self.n = len(ids)
        self.buf = torch.empty(max(64, 2 * self.n), dtype=torch.long, device=device)
        self.buf[:self.n] = torch.tensor(list(ids), dtype=torch.long)

    def append(self, tok: int) -> None:
        if self.n == len(self.buf):
            self.buf = torch.cat([self.buf, torch.empty_like(self.buf)])
        self.buf[self.n] = tok
        self.n += 1

    def view(self) -> torch.Tensor:
        return self.buf[:self.n]


class Sampler:
    """The sampler of one generation: ``params`` over the tokens so far, one transfer per token.

    The adjustments touch only the ids concerned (the bias's, those seen so far), on one copy of
    the logits: a few microseconds, where a pass over the whole vocabulary per penalty cost more
    than a millisecond per token on a CPU."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int], vocab_size: int, device: torch.device,
                 generator: torch.Generator | None, constraint: Constraint | None = None):
        self.p, self.generator, self.constraint = params, generator, constraint
        self.generated: list[int] = []
        self.counts = self.gen_ids = self.seen_ids = self.bias_ids = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)        # [V]
            self.gen_ids = _Ids([], device)
        if params.repetition_penalty != 1.0:
            self.seen_ids = _Ids(sorted(set(prompt)), device)        # prompt and generated, repeats allowed
        if params.logit_bias:
            ids = sorted(params.logit_bias)
            self.bias_ids = torch.tensor(ids, dtype=torch.long, device=device)
            self.bias_vals = torch.tensor([params.logit_bias[i] for i in ids], dtype=torch.float32, device=device)
        self._masks: dict[tuple, torch.Tensor] = {}
        self._adjusts = (self.counts is not None or self.seen_ids is not None or self.bias_ids is not None
                         or constraint is not None)

    def __call__(self, logits: torch.Tensor) -> Step:
        """Choose the next token from float32 logits [V] and remember it."""
        p = self.p
        x = self._adjusted(logits) if self._adjusts else logits
        chosen = _choose(x, p.temperature, p.top_p, p.top_k, p.min_p, self.generator)      # 0-d
        if p.logprobs is None:
            step = Step(int(chosen))
        else:
            lse = torch.logsumexp(logits, -1)
            picked = logits[chosen] - lse
            top_v, top_i = torch.topk(logits, p.logprobs) if p.logprobs else (logits[:0], chosen.new_empty(0))
            packed = torch.cat([chosen.double().reshape(1), picked.double().reshape(1),
                                top_i.double(), (top_v - lse).double()]).tolist()          # one transfer
            k = p.logprobs
            step = Step(int(packed[0]), packed[1], tuple(zip(map(int, packed[2:2 + k]), packed[2 + k:])))
        self._remember(step.token)
        return step

    @property
    def greedy(self) -> bool:
        """Whether the choice is the plain argmax of the logits (no adjustments, no logprobs), so
        a batch's rows may be chosen together (``argmax`` along the last dimension picks the same
        first maximum as one row's)."""
        return self.p.temperature <= 0 and not self._adjusts and self.p.logprobs is None

    def take(self, token: int) -> Step:
        """Remember ``token``, chosen outside (a batch's argmax; see ``greedy``)."""
        self._remember(token)
        return Step(token)

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits after bias, penalties and the constraint's mask (``logits`` is not changed)."""
        x = logits.clone()
        if self.bias_ids is not None:
            x.index_add_(0, self.bias_ids, self.bias_vals)
        if self.seen_ids is not None:                 # repeated ids write the same value
            ids, r = self.seen_ids.view(), self.p.repetition_penalty
            v = x[ids]
            x.index_copy_(0, ids, torch.where(v > 0, v / r, v * r))
        if self.counts is not None and self.generated:
            ids = self.gen_ids.view()
            x.index_copy_(0, ids, x[ids] - self.p.frequency_penalty * self.counts[ids] - self.p.presence_penalty)
        mask = self.constraint(self.generated) if self.constraint is not None else None
        if mask is not None:
            key = tuple(mask.ids)               # a constraint has a few masks: each goes over once
            if (ids := self._masks.get(key)) is None:
                ids = self._masks[key] = torch.tensor(key, dtype=torch.long, device=x.device)
            if mask.allow:
                x = torch.full_like(x, float("-inf")).index_copy_(0, ids, x[ids])
            else:
                x.index_fill_(0, ids, float("-inf"))
        return x

    def _remember(self, tok: int) -> None:
        self.generated.append(tok)
        if self.counts is not None:
            self.counts[tok] += 1
            self.gen_ids.append(tok)
        if self.seen_ids is not None:
            self.seen_ids.append(tok)

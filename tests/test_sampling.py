"""The engine's sampler: top-k, min-p, penalties, logit bias, masks, log-probabilities.

Distributions are checked by drawing many tokens and comparing the frequencies with the
distribution the parameters define, computed here from their definitions (5 sigma); the
adjustments that depend on the tokens so far are checked on greedy choices, which they decide.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from gptoss_cli.engine import Engine
from gptoss_cli.sampling import Sampler, SamplingParams, TokenMask, sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0, 1.5, -2.0])


def reference(logits, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0):
    """The distribution the parameters define, written from their definitions."""
    probs = torch.softmax(logits / temperature, -1)
    if top_k:
        probs[torch.argsort(probs, descending=True)[top_k:]] = 0
    if min_p:
        probs[probs < min_p * probs.max()] = 0
    probs /= probs.sum()
    order = torch.argsort(probs, descending=True)
    keep = (torch.cumsum(probs[order], 0) - probs[order]) < top_p
    want = torch.zeros_like(probs)
    want[order[keep]] = probs[order[keep]]
    return want / want.sum()


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(min_p=0.3), dict(top_k=4, top_p=0.8),
                                dict(min_p=0.1, top_p=0.7, temperature=0.7)])
def test_top_k_and_min_p_draw_the_distribution_they_define(kw):
    want = reference(LOGITS, **kw)
    gen = torch.Generator().manual_seed(3)
    n = 30_000
    temperature = kw.pop("temperature", 1.0)
    top_p = kw.pop("top_p", 1.0)
    draws = torch.tensor([sample(LOGITS, temperature, top_p, gen, **kw) for _ in range(n)])
    counts = torch.bincount(draws, minlength=len(LOGITS)).double()
    sigma = (want * (1 - want) / n).sqrt()
    assert ((counts / n - want).abs() <= 5 * sigma + 1e-12).all(), (counts / n, want)
    assert counts[want == 0].sum() == 0


def greedy(params: SamplingParams, prompt=(), generated=(), logits=LOGITS, constraint=None) -> int:
    s = Sampler(params, list(prompt), len(logits), logits.device, None, constraint)
    for tok in generated:
        s._remember(tok)
    return s(logits).token


def test_penalties_and_bias_move_the_greedy_choice_as_defined():
    plain = SamplingParams(temperature=0)
    assert greedy(plain) == 0
    # frequency: 2.0 - 0.6 * 2 = 0.8 < 1.5 (token 6); once: 1.4 < 1.5 as well; presence 0.4: 1.6 > 1.5
    assert greedy(SamplingParams(temperature=0, frequency_penalty=0.6), generated=[0, 0]) == 6
    assert greedy(SamplingParams(temperature=0, frequency_penalty=0.6), generated=[0]) == 6
    assert greedy(SamplingParams(temperature=0, presence_penalty=0.4), generated=[0, 0, 0]) == 0
    assert greedy(SamplingParams(temperature=0, presence_penalty=0.6), generated=[0, 0, 0]) == 6
    # negative penalties favour what was said: token 2 (0.5) + 2 * 0.8 = 2.1 > 2.0
    assert greedy(SamplingParams(temperature=0, frequency_penalty=-0.8), generated=[2, 2]) == 2
    # repetition (CTRL): prompt tokens count too; 2.0 / 1.5 = 1.33 < 1.5; a negative logit is multiplied
    assert greedy(SamplingParams(temperature=0, repetition_penalty=1.5), prompt=[0]) == 6
    assert greedy(SamplingParams(temperature=0, repetition_penalty=1.5), prompt=[5, 3]) == 0
    flat = torch.tensor([-1.0, -1.2, -3.0])
    assert greedy(SamplingParams(temperature=0, repetition_penalty=1.5), prompt=[0], logits=flat) == 1
    assert greedy(SamplingParams(temperature=0, logit_bias={5: 100.0})) == 5
    assert greedy(SamplingParams(temperature=0, logit_bias={0: -100.0, 6: -100.0})) == 1


def test_a_mask_allows_or_bans_tokens():
    assert greedy(SamplingParams(temperature=0), constraint=lambda g: TokenMask([3, 4], True)) == 3
    assert greedy(SamplingParams(temperature=0), constraint=lambda g: TokenMask([0, 6], False)) == 1
    seen = []
    s = Sampler(SamplingParams(temperature=1.0), [], len(LOGITS), LOGITS.device, torch.Generator().manual_seed(0),
                lambda g: seen.append(list(g)) or TokenMask([7], True))
    assert [s(LOGITS).token for _ in range(3)] == [7, 7, 7] and seen == [[], [7], [7, 7]]


def test_logprobs_are_the_models_own_distribution():
    s = Sampler(SamplingParams(temperature=0, logprobs=3, logit_bias={4: 50.0}), [], len(LOGITS), LOGITS.device, None)
    step = s(LOGITS)
    ref = torch.log_softmax(LOGITS, -1)
    assert step.token == 4 and step.logprob == pytest.approx(float(ref[4]), abs=1e-6)    # biased, not its logprob
    assert [t for t, _ in step.top] == [0, 6, 1]
    assert [lp for _, lp in step.top] == pytest.approx(ref[[0, 6, 1]].tolist(), abs=1e-6)
    none = Sampler(SamplingParams(logprobs=0), [], len(LOGITS), LOGITS.device, None)(LOGITS)
    assert none.top == () and none.logprob is not None


def test_engine_generation_honours_the_parameters_and_stays_reproducible(tiny_full):
    eng = Engine.load(tiny_full, device="cpu", dtype="float32", max_context=256)
    prompt = list(range(1000, 1020))
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=50, min_p=0.01, presence_penalty=0.5,
              frequency_penalty=0.3, repetition_penalty=1.2, seed=7)
    a = list(eng.generate(prompt, **kw))
    assert a == list(eng.generate(prompt, **kw)) and len(a) == 12
    assert list(eng.generate(prompt, max_new_tokens=5, temperature=0, logit_bias={42: 100.0})) == [42] * 5
    # a strong frequency penalty makes greedy decoding avoid repeating itself
    varied = list(eng.generate(prompt, max_new_tokens=12, temperature=0, frequency_penalty=100.0))
    assert len(set(varied)) == 12
    # the logprobs of generated tokens are those of the model on prompt + tokens (decode vs prefill)
    steps = list(eng.stream(prompt, SamplingParams(temperature=0, logprobs=2), max_new_tokens=6))
    scored, _, _ = eng.prompt_logprobs(prompt + [s.token for s in steps])
    assert [s.logprob for s in steps] == pytest.approx(scored[len(prompt) - 1:].tolist(), abs=1e-4)
    assert all(s.top[0][0] == s.token for s in steps)               # greedy: the chosen one is the top


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(top_p=0.9, top_k=40, min_p=0.05),
                                    SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.5,
                                                   repetition_penalty=1.3, logit_bias={1: 2.0}, logprobs=5)])
def test_one_device_to_host_transfer_per_token(params):
    logits = torch.randn(201088, device="cuda")
    s = Sampler(params, [1, 2, 3], logits.numel(), logits.device, torch.Generator(device="cuda").manual_seed(0))
    s(logits)                                               # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):
                s(logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 5, [str(w.message) for w in syncs]

"""The PyTorch runtime against transformers' GptOss, and cached decoding against uncached."""

from __future__ import annotations

import time

import pytest
import torch

from gptoss_cli.engine import Engine

PROMPT = [(7919 * i + 13) % 200000 for i in range(70)]   # much longer than the window of 16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def oracle_logits(hf_oracle):
    with torch.no_grad():
        return hf_oracle(torch.tensor([PROMPT])).logits[0].float()


@pytest.mark.parametrize("layout", ["hf-sharded", "hf-single", "original"])
def test_logits_match_transformers_fp32(layout, tiny_full, tiny_hf_single, oracle_logits):
    folder = {"hf-sharded": tiny_full, "hf-single": tiny_hf_single, "original": tiny_full / "original"}[layout]
    eng = Engine.load(folder, device="cpu", dtype="float32")
    assert rel_err(eng.logits(PROMPT), oracle_logits) < 1e-4


def test_logits_match_transformers_bf16(tiny_full, hf_oracle_bf16, oracle_logits):
    with torch.no_grad():
        ref_bf16 = hf_oracle_bf16(torch.tensor([PROMPT])).logits[0].float()
    ours = Engine.load(tiny_full, device="cpu", dtype="bfloat16").logits(PROMPT)
    # bf16 against the fp32 truth: ours within a few percent, and no worse than transformers' bf16
    ours_err = ((ours - oracle_logits).norm() / oracle_logits.norm()).item()
    theirs_err = ((ref_bf16 - oracle_logits).norm() / oracle_logits.norm()).item()
    assert ours_err < 0.03
    assert ours_err < 2 * theirs_err + 1e-3
    assert ((ours - ref_bf16).norm() / ref_bf16.norm()).item() < 0.03


def test_greedy_generation_matches_transformers(tiny_full, hf_oracle):
    prompt = PROMPT[:9]
    eng = Engine.load(tiny_full, device="cpu", dtype="float32")
    ours = list(eng.generate(prompt, max_new_tokens=40, temperature=0))
    with torch.no_grad():
        ref = hf_oracle.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                 min_new_tokens=40)[0, len(prompt):].tolist()
    assert ours == ref                       # 49 positions: three times the window


def test_cached_decode_equals_uncached_forward(tiny_full):
    eng = Engine.load(tiny_full, device="cpu", dtype="float32")
    prompt = PROMPT[:5]
    new = list(eng.generate(prompt, max_new_tokens=30, temperature=0))
    full = prompt + new
    uncached = Engine.load(tiny_full, device="cpu", dtype="float32").logits(full)
    # every greedy choice is the argmax of the uncached logits at that position
    assert uncached[len(prompt) - 1:-1].argmax(-1).tolist() == new


def _fresh(folder, tokens, **kw):
    return list(Engine.load(folder, device="cpu", dtype="float32").generate(tokens, **kw))


@pytest.mark.parametrize("case", ["extend", "branch-in-ring", "branch-far-back", "same-prompt", "chat-turn"])
def test_prefix_reuse_gives_what_a_fresh_engine_gives(tiny_full, case):
    eng = Engine.load(tiny_full, device="cpu", dtype="float32")
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    first = PROMPT[:40]
    reply = list(eng.generate(first, **kw))
    if case == "extend":            # the whole previous sequence, then more
        second = first + reply[:-1] + PROMPT[40:50]
    elif case == "branch-in-ring":  # diverges 3 tokens back: the rings still hold the window
        second = first + reply[:-4] + [11, 12]
    elif case == "branch-far-back":  # diverges 30 tokens back: far beyond what the rings hold
        second = first[:10] + [5, 6, 7]
    elif case == "same-prompt":     # regenerate: the stored snapshot and logits are reused
        second = first
    else:                           # a chat turn: the reply is re-rendered, the prompt kept
        second = first + [200005, 99, 98, 200007] + PROMPT[50:60]
    got = list(eng.generate(second, **kw))
    assert got == _fresh(tiny_full, second, **kw)
    if case in ("extend", "same-prompt", "chat-turn"):
        assert eng.last_stats.reused_tokens >= len(first) - 1


def test_interrupted_generation_leaves_a_reusable_cache(tiny_full):
    eng = Engine.load(tiny_full, device="cpu", dtype="float32")
    kw = dict(max_new_tokens=20, temperature=0)
    it = eng.generate(PROMPT[:30], **kw)
    partial = [next(it) for _ in range(7)]
    it.close()                                   # what a Ctrl-C in the consumer does
    second = PROMPT[:30] + partial + [42, 43]
    assert list(eng.generate(second, **kw)) == _fresh(tiny_full, second, **kw)


def test_windowed_layers_cost_a_window_not_the_context(tiny_full):
    eng = Engine.load(tiny_full, device="cpu", dtype="float32", max_context=4096)
    cfg = eng.config
    for windowed, layer in zip(cfg.windowed_layers, eng.cache.layers):
        assert layer.k.shape[1] == (cfg.sliding_window if windowed else 4096)


def test_experts_stay_packed_after_load(tiny_full):
    eng = Engine.load(tiny_full, device="cpu", dtype="bfloat16")
    for b in eng.model.blocks:
        assert b.w1_blocks.dtype == torch.uint8 and b.w2_blocks.dtype == torch.uint8
        assert b.w1_blocks.shape[-1] == 16


def test_sampling_is_deterministic_with_a_seed(tiny_full):
    eng = Engine.load(tiny_full, device="cpu", dtype="float32")
    kw = dict(max_new_tokens=15, temperature=1.0, top_p=0.95, seed=1234)
    a = list(eng.generate(PROMPT[:20], **kw))
    eng._reset()
    assert a == list(eng.generate(PROMPT[:20], **kw))
    assert a != list(eng.generate(PROMPT[:20], **(kw | {"seed": 99})))


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_sampling_draws_the_softmax_distribution(monkeypatch, top_p):
    """``sample`` draws each token with its softmax probability (renormalised over the nucleus
    with top-p), whether the nucleus is found among the top-k or by sorting everything."""
    from gptoss_cli import sampling

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0, 1.5, -2.0])
    probs = torch.softmax(logits / 0.9, -1)
    order = torch.argsort(probs, descending=True)
    keep = (torch.cumsum(probs[order], 0) - probs[order]) < top_p
    want = torch.zeros_like(probs)
    want[order[keep]] = probs[order[keep]]
    want /= want.sum()
    n = 40_000
    for topk in (3, 1024):             # 3: the top-3 hold less than 0.7, so it sorts them all
        monkeypatch.setattr(sampling, "NUCLEUS_TOPK", topk)
        gen = torch.Generator().manual_seed(5)
        counts = torch.bincount(torch.tensor([sampling.sample(logits, 0.9, top_p, gen) for _ in range(n)]),
                                minlength=len(logits)).double()
        sigma = (want * (1 - want) / n).sqrt()
        assert ((counts / n - want).abs() <= 5 * sigma + 1e-12).all(), (counts / n, want)
        assert counts[want == 0].sum() == 0


def test_decode_step_refuses_a_position_past_the_cache(tiny_full):
    """The static step writes the KV cache at ``pos`` on the device, unchecked there: a position
    past the cache must stop it on the host, with an error a user can read."""
    from gptoss_cli.engine import DecodeStep
    from gptoss_cli.errors import ContextFullError

    eng = Engine.load(tiny_full, device="cpu", dtype="float32", max_context=32)
    step = DecodeStep(eng.model, eng.cache, graph=False)
    for pos in (32, 1000, -1):
        with pytest.raises(ContextFullError, match="past the cache's 32 positions"):
            step(5, pos)
    assert eng.cache.length == 0


def test_sampling_never_draws_a_token_without_mass():
    from gptoss_cli.sampling import _draw

    gen = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.0, 0.0, 3.0, 0.0, 1.0, 0.0])
    assert {_draw(weights, gen) for _ in range(2000)} == {2, 4}


def test_stop_tokens_and_context_limit(tiny_full):
    eng = Engine.load(tiny_full, device="cpu", dtype="float32", max_context=32)
    greedy = list(eng.generate(PROMPT[:8], max_new_tokens=10, temperature=0))
    stopped = list(eng.generate(PROMPT[:8], max_new_tokens=10, temperature=0, stop_tokens=[greedy[3]]))
    assert stopped == greedy[:greedy.index(greedy[3]) + 1] and eng.last_stats.stop_reason == "stop"
    out = list(eng.generate(PROMPT[:20], max_new_tokens=50, temperature=0))
    assert len(out) == 32 - 20 + 1 and eng.last_stats.stop_reason == "context"


def test_warmup_costs_nothing_on_cpu(tiny_full):
    """``load_engine`` warms the engine up behind its spinner: on the CPU reference path there is
    nothing to compile, so it must return at once and change nothing."""
    eng = Engine.load(tiny_full, device="cpu", dtype="float32")
    t0 = time.perf_counter()
    eng.warmup()
    assert time.perf_counter() - t0 < 0.05 and eng.cached_tokens == [] and eng.cache.length == 0

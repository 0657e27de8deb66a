"""The batched engine (``batch.py``): many sequences, one decode step, each exactly as if alone."""

from __future__ import annotations

import threading

import pytest
import torch

from gptoss_cli.batch import BatchEngine, BatchView
from gptoss_cli.config import PRESETS
from gptoss_cli.engine import Engine, GenerationStats, Prefill, Sequence
from gptoss_cli.errors import ContextFullError, GptossError
from gptoss_cli.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
# prompts of different lengths: every sequence at its own position, some past the tiny window (16)
PROMPTS = [[(7 * i + j) % 500 + 1 for j in range(3 + 5 * i)] for i in range(5)]


@pytest.fixture(scope="module")
def eng():
    return Engine.random(PRESETS["tiny"], device="cpu", dtype="float32", max_context=128, seed=3)


@pytest.fixture(scope="module")
def alone(eng):
    """Each prompt's greedy continuation from a fresh one-sequence engine."""
    out = []
    for p in PROMPTS:
        eng._reset()
        out.append(list(eng.generate(p, max_new_tokens=24, temperature=0)))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _model_rows_vs_alone(eng: Engine, prompts: list[list[int]], steps: int) -> float:
    """Decode ``prompts`` together through ``forward_rows`` and each alone through ``forward``:
    the largest relative difference of their logits over ``steps`` greedy steps."""
    model = eng.model
    pool = model.new_pool(len(prompts) + 1)
    seqs = [Sequence(model, pool.sequence(b)) for b in (2, 0, 1)[:len(prompts)]]   # slots out of order
    solo = [Sequence(model, model.new_cache(1)) for _ in prompts]
    last_b, last_s = [], []
    for p, sb, ss in zip(prompts, seqs, solo):
        for seq, last in ((sb, last_b), (ss, last_s)):
            fill = Prefill(seq, p, GenerationStats())
            while fill.logits is None:
                fill.advance(7)               # small pieces: they cross the window
            last.append(fill.logits)
    worst = 0.0
    pos = [len(p) for p in prompts]
    rows = torch.tensor((2, 0, 1)[:len(prompts)])
    for _ in range(steps):
        toks = [int(lg.argmax()) for lg in last_s]
        assert toks == [int(lg.argmax()) for lg in last_b]          # greedy tokens equal
        h = model.forward_rows(torch.tensor(toks), rows, torch.tensor(pos), pool)
        batched = model.logits(h)
        last_s = []
        for i, (seq, t) in enumerate(zip(solo, toks)):
            last_s.append(model.logits(model.forward(torch.tensor([[t]]), seq.cache, pos[i])[0, -1]))
            worst = max(worst, _rel(batched[i], last_s[-1]))
        last_b = list(batched)
        pos = [p + 1 for p in pos]
    return worst


def test_forward_rows_gives_each_sequence_what_it_gets_alone(eng):
    assert _model_rows_vs_alone(eng, PROMPTS[:3], steps=20) < 1e-5


@pytest.mark.slow
def test_forward_rows_at_20b_widths():
    """gpt-oss-20b's widths (2 layers, a short vocabulary to keep the test's memory small), fp32."""
    cfg = PRESETS["gpt-oss-20b"]
    cfg = cfg.replace(n_layers=2, windowed_layers=cfg.windowed_layers[:2], vocab_size=2048)
    big = Engine.random(cfg, device="cpu", dtype="float32", max_context=160, seed=5)
    prompts = [[(11 * i + j) % 2000 + 1 for j in range(n)] for i, n in enumerate((5, 140, 33))]
    assert _model_rows_vs_alone(big, prompts, steps=4) < 1e-5


@pytest.mark.parametrize("static", [False, True], ids=["eager", "padded-static"])
def test_greedy_tokens_equal_alone_whatever_joins_and_leaves(eng, alone, static):
    """5 prompts through 3 slots: they wait, join with chunked prefill (budget 5 tokens a round)
    beside sequences that decode, leave when done; each gives what it gives alone. ``static``:
    the step CUDA graphs replay, padded to its bucket, run eagerly."""
    be = BatchEngine(eng, 3, prefill_budget=5, static=static)
    reqs = [be.submit(p, GREEDY, 24) for p in PROMPTS]
    assert [r.tokens_out() for r in reqs] == alone
    assert be.rows_decoded / be.rounds > 1.5                  # rounds were shared
    assert all(r.stats.stop_reason == "length" and r.stats.decode_tokens == 23 for r in reqs)


def test_seeded_sampling_is_the_same_alone_or_beside_others(eng):
    params = SamplingParams(temperature=1.0, top_p=0.9)
    eng._reset()
    ref = [s.token for s in eng.stream(PROMPTS[1], params, 20, seed=11)]
    be = BatchEngine(eng, 4)
    reqs = [be.submit(p, params, 20, seed=11 if i == 1 else 100 + i) for i, p in enumerate(PROMPTS)]
    got = [r.tokens_out() for r in reqs]
    assert got[1] == ref


def test_greedy_rows_chosen_together_beside_sampled_ones(eng, alone):
    """The greedy rows of a step take one argmax over the batch; sampled rows and rows asking
    for logprobs beside them keep their own sampler, and every one gives what it gives alone."""
    # top_k keeps the draw off rounding's edge: batched logits differ from one sequence's by
    # ~1e-6 (not bitwise), and over the random model's ~180,000 near-equal tokens of top_p 0.9
    # such a difference can move an inverse-CDF draw by one token (seen at 4-5 rows, token 12)
    sampled = SamplingParams(temperature=1.0, top_k=40)
    logprobs = SamplingParams(temperature=0, logprobs=2)
    eng._reset()
    ref_sampled = [s.token for s in eng.stream(PROMPTS[1], sampled, 20, seed=5)]
    eng._reset()
    ref_lp = list(eng.stream(PROMPTS[3], logprobs, 20))
    be = BatchEngine(eng, 5)
    reqs = [be.submit(PROMPTS[0], GREEDY, 24), be.submit(PROMPTS[1], sampled, 20, seed=5),
            be.submit(PROMPTS[2], GREEDY, 24), be.submit(PROMPTS[3], logprobs, 20), be.submit(PROMPTS[4], GREEDY, 24)]
    lp = list(reqs[3])
    assert [r.tokens_out() for r in (reqs[0], reqs[2], reqs[4])] == [alone[0], alone[2], alone[4]]
    assert reqs[1].tokens_out() == ref_sampled
    assert [s.token for s in lp] == [s.token for s in ref_lp] == alone[3][:20]
    for got, ref in zip(lp, ref_lp):
        assert [t for t, _ in got.top] == [t for t, _ in ref.top] and len(got.top) == 2
        assert [v for _, v in got.top] == pytest.approx([v for _, v in ref.top], abs=1e-4)
        assert got.logprob == pytest.approx(ref.logprob, abs=1e-4)


def test_cancelling_one_never_changes_another(eng, alone):
    be = BatchEngine(eng, 3)
    reqs = [be.submit(p, GREEDY, 24) for p in PROMPTS[:3]]
    it = iter(reqs[1])
    first = [next(it) for _ in range(4)]
    it.close()                                 # the caller leaves: its slot is free next round
    slot = reqs[1].slot
    assert [s.token for s in first] == alone[1][:4]
    outs = [reqs[0].tokens_out(), reqs[2].tokens_out()]
    assert outs == [alone[0], alone[2]]
    assert reqs[1].stats.stop_reason == "cancelled" and be.busy[slot] is None
    # and the slot it left serves the next request exactly
    assert be.submit(PROMPTS[3], GREEDY, 24).tokens_out() == alone[3]


def test_a_slot_reuses_its_prefix_exactly(eng, alone):
    be = BatchEngine(eng, 2)
    first = be.submit(PROMPTS[4], GREEDY, 24)
    assert first.tokens_out() == alone[4]
    follow = PROMPTS[4] + alone[4][:-1] + [42, 43]             # the next turn of that conversation
    again = be.submit(follow, GREEDY, 10)
    got = again.tokens_out()
    assert again.slot == first.slot and again.stats.reused_tokens >= len(PROMPTS[4])
    eng._reset()
    assert got == list(eng.generate(follow, max_new_tokens=10, temperature=0))


def test_threads_through_views(eng, alone):
    """A thread per caller, each through its own view, the rounds on the engine's thread."""
    be = BatchEngine(eng, 4).start()
    results = {}

    def work(i):
        view = BatchView(be)
        results[i] = list(view.generate(PROMPTS[i], max_new_tokens=24, temperature=0))
        assert view.last_stats.decode_tokens == 23

    threads = [threading.Thread(target=work, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    be.close()
    assert [results[i] for i in range(5)] == alone
    assert be.rows_decoded / be.rounds > 1.5
    with pytest.raises(GptossError, match="closed"):
        be.submit(PROMPTS[0])


def test_stops_and_bad_input(eng, alone):
    be = BatchEngine(eng, 2, max_context=40)
    stop = alone[0][5]
    req = be.submit(PROMPTS[0], GREEDY, 24, stop_tokens=[stop])
    out = req.tokens_out()
    assert out == alone[0][:alone[0].index(stop) + 1] and req.stats.stop_reason == "stop"
    long = be.submit(PROMPTS[4], GREEDY, 100)                # 23 tokens + 17 = the slot's 40
    assert len(long.tokens_out()) == 40 - len(PROMPTS[4]) + 1 and long.stats.stop_reason == "context"
    with pytest.raises(ContextFullError):
        be.submit(list(range(1, 41)))
    with pytest.raises(GptossError, match="outside the vocabulary"):
        be.submit([eng.config.vocab_size])
    with pytest.raises(GptossError, match="at least 1"):
        BatchEngine(eng, 0)

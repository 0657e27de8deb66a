"""The whole engine on the Triton kernels against the PyTorch reference path.

Without a GPU: the kernels forced onto CPU tensors (``GPTOSS_KERNELS=1``) under Triton's
interpreter, on the tiny checkpoint, including the static decode step that the CUDA graph
captures (run eagerly here). With a GPU: the engine on CUDA against the engine on CPU, graph on
against graph off, and the ``GPTOSS_KERNELS=0`` switch.
"""

from __future__ import annotations

import os

import pytest
import torch
from kernels_util import cuda_only, rel_err

from gptoss_cli import ops
from gptoss_cli.engine import DecodeStep, Engine

PROMPT = [(7919 * i + 13) % 200000 for i in range(40)]   # longer than the window of 16
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="kernels on CPU tensors need TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def ref_engine(tiny_full):
    return Engine.load(tiny_full, device="cpu", dtype="float32")


def _kernel_engine(folder, monkeypatch, static_decode: bool, context: int = 128) -> Engine:
    monkeypatch.setenv(ops.KERNELS_ENV, "1")
    # a short context: the static step attends over the whole buffer, slow under the interpreter
    eng = Engine.load(folder, device="cpu", dtype="float32", max_context=context)
    if static_decode:        # the step the CUDA graph captures, run eagerly
        eng._decoder = DecodeStep(eng.model, eng.cache, graph=False, counters=eng.counters)
    return eng


@interpreted
def test_engine_logits_on_kernels(tiny_full, ref_engine, monkeypatch):
    eng = _kernel_engine(tiny_full, monkeypatch, static_decode=False)
    info = eng.runtime_info()
    assert info["ops"] == "triton" and "_attn_fwd" in info["kernels"] and "_moe_gemm1" in info["kernels"]
    assert rel_err(eng.logits(PROMPT), ref_engine.logits(PROMPT)) < 1e-4


@interpreted
@pytest.mark.slow
def test_engine_decode_on_kernels(tiny_full, ref_engine, monkeypatch):
    """Greedy tokens through prefill, the static decode step (past the window: ring wraps), and
    a second call that reuses the cached prefix; after ``warmup`` (what ``load_engine`` runs),
    which must leave nothing behind."""
    eng = _kernel_engine(tiny_full, monkeypatch, static_decode=True)
    eng.warmup()
    assert eng.cached_tokens == [] and eng.snapshots == [] and eng.cache.length == 0
    kw = dict(max_new_tokens=10, temperature=0)
    first = list(eng.generate(PROMPT[:12], **kw))
    assert first == list(ref_engine.generate(PROMPT[:12], **kw))
    second = PROMPT[:12] + first[:-1] + [5, 6]
    assert list(eng.generate(second, **kw)) == list(ref_engine.generate(second, **kw))
    assert eng.last_stats.reused_tokens >= 12


@interpreted
def test_batched_forward_on_kernels(tiny_full, ref_engine, monkeypatch):
    """B aligned streams through Transformer.forward (what ``gptoss bench`` runs): a prompt
    crossing the window, then two single-token steps."""
    eng = _kernel_engine(tiny_full, monkeypatch, static_decode=False)
    tokens = torch.tensor([PROMPT[:20], PROMPT[20:40]])                      # [2, 20]
    caches = eng.model.new_cache(2), ref_engine.model.new_cache(2)
    steps = [(tokens, 0), (tokens[:, :1], 20), (tokens[:, 1:2], 21)]
    for toks, start in steps:
        tri_h = eng.model.forward(toks, caches[0], start)
        ref_h = ref_engine.model.forward(toks, caches[1], start)
        assert rel_err(tri_h, ref_h) < 1e-4


@interpreted
def test_two_engines_count_with_their_own_counters(tiny_full, ref_engine, monkeypatch):
    """The kernels' last-program counters belong to an engine (``arrive.py``): two engines get
    distinct buffers, each one's kernels count only with its own, and two generations
    interleaved token by token (each engine's step between the other's) both stay exact."""
    from gptoss_kernels import arrive

    a = _kernel_engine(tiny_full, monkeypatch, static_decode=True)
    b = _kernel_engine(tiny_full, monkeypatch, static_decode=False)
    assert a.counters is not None and b.counters is not None
    assert a.counters.data_ptr() != b.counters.data_ptr() and a._decoder.counters is a.counters
    seen = []
    real = arrive.counters
    monkeypatch.setattr(arrive, "counters", lambda device, n: seen.append(real(device, n)) or seen[-1])
    for mod in ("moe", "moe_decode", "attention"):
        monkeypatch.setattr(f"gptoss_kernels.{mod}.counters", arrive.counters)
    kw = dict(max_new_tokens=4, temperature=0)
    runs = {a: a.generate(PROMPT[:12], **kw), b: b.generate(PROMPT[3:15], **kw)}
    got = {a: [], b: []}
    while runs:
        for eng in list(runs):
            seen.clear()
            try:
                got[eng].append(next(runs[eng]))
            except StopIteration:
                del runs[eng]
                continue
            assert all(buf is eng.counters for buf in seen), "a kernel counted with another engine's buffer"
    assert got[a] == list(ref_engine.generate(PROMPT[:12], **kw))
    assert got[b] == list(ref_engine.generate(PROMPT[3:15], **kw))
    assert not a.counters.any() and not b.counters.any()


def test_cpu_engine_reports_its_path(tiny_full, monkeypatch):
    info = Engine.load(tiny_full, device="cpu", dtype="float32", cuda_graph=True).runtime_info()
    assert info["ops"].startswith("cpu-native") and info["kernels"] == [] and info["cuda_graph"] is False
    monkeypatch.setenv(ops.KERNELS_ENV, "0")
    assert Engine.load(tiny_full, device="cpu", dtype="float32").runtime_info()["ops"] == "pytorch-reference"


def test_reference_switch(monkeypatch):
    monkeypatch.setenv(ops.KERNELS_ENV, "0")
    assert not ops.use_kernels(torch.device("cuda")) and ops.kernel_names(torch.device("cuda")) == []
    monkeypatch.setenv(ops.KERNELS_ENV, "auto")
    assert not ops.use_kernels(torch.device("cpu"))
    monkeypatch.setenv(ops.KERNELS_ENV, "yes")
    with pytest.raises(ValueError):
        ops.use_kernels(torch.device("cpu"))


# ---- on a GPU -----------------------------------------------------------------------------------
@cuda_only
def test_cuda_engine_matches_cpu_fp32(tiny_full, ref_engine):
    eng = Engine.load(tiny_full, device="cuda", dtype="float32")
    info = eng.runtime_info()
    assert info["ops"] == "triton" and info["cuda_graph"] is True
    assert rel_err(eng.logits(PROMPT), ref_engine.logits(PROMPT)) < 1e-3
    kw = dict(max_new_tokens=30, temperature=0)
    assert list(eng.generate(PROMPT[:9], **kw)) == list(ref_engine.generate(PROMPT[:9], **kw))


@cuda_only
def test_cuda_engine_bf16_close_to_cpu_fp32(tiny_full, ref_engine):
    eng = Engine.load(tiny_full, device="cuda", dtype="bfloat16")
    ours, truth = eng.logits(PROMPT), ref_engine.logits(PROMPT)
    assert ((ours - truth).norm() / truth.norm()).item() < 0.03


@cuda_only
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_graph_gives_the_eager_tokens(tiny_full, dtype):
    kw = dict(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=7)
    graph = Engine.load(tiny_full, device="cuda", dtype=dtype, cuda_graph=True)
    eager = Engine.load(tiny_full, device="cuda", dtype=dtype, cuda_graph=False)
    assert graph.runtime_info()["cuda_graph"] and not eager.runtime_info()["cuda_graph"]
    a = list(graph.generate(PROMPT[:20], **kw))
    assert a == list(eager.generate(PROMPT[:20], **kw))
    # again after prefix reuse (the cache restored in place under the captured graph)
    second = PROMPT[:20] + a[:5] + [3, 4]
    assert list(graph.generate(second, **kw)) == list(eager.generate(second, **kw))


@cuda_only
def test_cuda_reference_switch(tiny_full, ref_engine, monkeypatch):
    monkeypatch.setenv(ops.KERNELS_ENV, "0")
    eng = Engine.load(tiny_full, device="cuda", dtype="float32")
    info = eng.runtime_info()
    assert info["ops"] == "pytorch-reference" and info["kernels"] == [] and info["cuda_graph"] is False
    assert rel_err(eng.logits(PROMPT), ref_engine.logits(PROMPT)) < 1e-3


@interpreted
@pytest.mark.slow
def test_batched_engine_on_kernels(tiny_full, ref_engine, monkeypatch):
    """Continuous batching on the kernels: 3 sequences through 2 slots, joining with chunked
    prefill, each step padded to its bucket as the CUDA graphs replay it (scratch-slot rows),
    rings wrapping; each sequence's greedy tokens are what the reference engine gives alone."""
    from gptoss_cli.batch import BatchEngine
    from gptoss_cli.sampling import SamplingParams

    eng = _kernel_engine(tiny_full, monkeypatch, static_decode=False, context=32)
    prompts = [PROMPT[:3], PROMPT[5:23], PROMPT[9:16]]        # the second crosses the window
    be = BatchEngine(eng, 2, prefill_budget=6, static=True)
    assert be.static and not be.use_graph
    reqs = [be.submit(p, SamplingParams(temperature=0), 6) for p in prompts]
    got = [r.tokens_out() for r in reqs]
    assert got == [list(ref_engine.generate(p, max_new_tokens=6, temperature=0)) for p in prompts]
    assert be.rows_decoded / be.rounds > 1.2                  # rounds were shared

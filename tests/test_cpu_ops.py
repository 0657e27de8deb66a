"""The native CPU MoE (``cpu_ops``, C++ at first use) against the reference ``ops.moe.reference``;
the native bf16 linear and decode attention against theirs.

Sizes are multiples of 32 (an MXFP4 block) but not of the library's tiles (4 rows, 4 tokens),
and thread counts split the rows unevenly; token counts cover decode (1-8) and prefill (150),
with experts that get no token, one, and many. The fallback when no compiler can build it is
tested too: it must say so and still give the reference's result.

Attention: the ways the runtime calls it at decode (T = 1) and for a few tokens (3, 16): a full
cache (slots by position, stale slots past the query, k and v slices of a bigger buffer) and a
ring (positions permuted, some slots empty); window on and off; GQA ratios 4 and 1; d_head 64
(the AVX-512 path) and 24 (the scalar one); q a strided view of a qkv projection, as in the model.

The small decode ops (rope_store, the norms, the router): B 1/2, T 1/3/16, ring and full caches
(the slots written, ring_pos, the slots left alone), with and without biases, GQA, d_head 64 and
16, routers of 8 and 32 experts; the experts chosen must be the reference's, ties included.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from kernels_util import moe_weights, poison_allocations, rel_err, rows_case  # noqa: F401

from gptoss_cli import cpu_ops, ops
from gptoss_cli.errors import GptossError


def _args(N, E, D, F, top_k, dtype):
    w = moe_weights(E, D, F, dtype, "cpu", seed=N * 7 + E)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(N)).to(dtype)
    return (x, *w.values(), top_k, 7.0)


@pytest.fixture(autouse=True)
def native_only():
    if cpu_ops.status().startswith("pytorch-reference"):
        pytest.fail(f"the native CPU MoE did not build here: {cpu_ops.status()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [1, 3, 8, 9, 150])
@pytest.mark.parametrize("E,D,F,top_k,threads", [(8, 224, 160, 4, 3), (4, 64, 32, 2, 1), (32, 96, 96, 4, 2)])
def test_native_moe_matches_reference(monkeypatch, dtype, N, E, D, F, top_k, threads):
    monkeypatch.setenv(cpu_ops.THREADS_ENV, str(threads))
    args = _args(N, E, D, F, top_k, dtype)
    ref_y = ops.moe.reference(*args)
    cpu_y = cpu_ops.moe(*args)
    assert cpu_y.shape == (N, D) and cpu_y.dtype == dtype
    assert rel_err(cpu_y, ref_y) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_native_moe_in_several_calls(monkeypatch):
    """A long prefill goes to the library in slices of MOE_MAX_TOKENS (Ctrl-C lands between them)."""
    monkeypatch.setattr(cpu_ops, "MOE_MAX_TOKENS", 64)
    args = _args(150, 8, 96, 64, 4, torch.float32)
    assert rel_err(cpu_ops.moe(*args), ops.moe.reference(*args)) < 1e-5


def test_no_compiler_falls_back_to_the_reference_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv(cpu_ops.CACHE_ENV, str(tmp_path / "cache"))
    cpu_ops._library.cache_clear()
    cpu_ops._warn_fallback.cache_clear()
    try:
        assert cpu_ops.status().startswith("pytorch-reference: building cpu_ops.cpp")
        args = _args(3, 8, 64, 64, 4, torch.float32)
        with pytest.warns(RuntimeWarning, match="slow PyTorch reference"):
            y = cpu_ops.moe(*args)
        assert torch.equal(y, ops.moe.reference(*args))
    finally:
        cpu_ops._library.cache_clear()
        cpu_ops._warn_fallback.cache_clear()


def test_thread_count(monkeypatch):
    """One setting for the library and PyTorch: GPTOSS_THREADS, else PyTorch's own count."""
    monkeypatch.delenv(cpu_ops.THREADS_ENV, raising=False)
    assert cpu_ops.cpu_threads() == torch.get_num_threads()
    before = torch.get_num_threads()
    monkeypatch.setenv(cpu_ops.THREADS_ENV, "3")
    try:
        assert cpu_ops.apply_thread_count() == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    for bad in ("0", "two"):
        monkeypatch.setenv(cpu_ops.THREADS_ENV, bad)
        with pytest.raises(GptossError, match="not a thread count"):
            cpu_ops.cpu_threads()


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("n_out,K,bias", [(37, 96, True), (5, 48, False), (700, 2880, True)])
def test_native_bf16_linear_matches_torch(monkeypatch, rows, n_out, K, bias):
    """Decode-sized bf16 projections: the library against F.linear (both accumulate in float32,
    so they differ by one bf16 rounding of the output at most)."""
    monkeypatch.setenv(cpu_ops.THREADS_ENV, "2")
    g = torch.Generator().manual_seed(n_out + rows)
    x = torch.randn(1, rows, K, generator=g).bfloat16()
    w = (torch.randn(n_out, K, generator=g) / K ** 0.5).bfloat16()
    b = torch.randn(n_out, generator=g).bfloat16() if bias else None
    ref_y = ops.linear.reference(x, w, b)
    cpu_y = ops.linear(x, w, b)
    assert cpu_y.shape == (1, rows, n_out) and cpu_y.dtype == torch.bfloat16
    assert rel_err(cpu_y, ref_y) < 8e-3
    # float32: the library's own projection (partial 4 x 4 tiles at 3 rows, a K tail at 48)
    x32, w32, b32 = x.float(), w.float(), None if b is None else b.float()
    y32 = cpu_ops.linear(x32, w32, b32)
    exact = x32.double() @ w32.double().T + (0 if b32 is None else b32.double())
    assert y32.dtype == torch.float32 and rel_err(y32, exact) < 1e-6
    # prefill, above LINEAR_MAX_ROWS: PyTorch's own
    many = torch.randn(cpu_ops.LINEAR_MAX_ROWS + 1, K, generator=g)
    assert torch.equal(cpu_ops.linear(many, w32, b32), torch.nn.functional.linear(many, w32, b32))
    assert torch.equal(cpu_ops.linear(many.bfloat16(), w, b), torch.nn.functional.linear(many.bfloat16(), w, b))


@pytest.mark.parametrize("rows", [1, 4, 8, 11, 16])
@pytest.mark.parametrize("n_out,K", [(64, 64), (37, 96), (201, 64), (201, 2880)])
def test_native_bf16_linear_rounds_as_torch(monkeypatch, rows, n_out, K):
    """The library's bf16 output (whole 4 x 4 tiles round 16 sums at once, the rest one by one)
    is exactly its own float32 output rounded by PyTorch: nearest even, ties and all."""
    lib, why = cpu_ops._library()
    if lib is None:
        pytest.skip(why)
    monkeypatch.setenv(cpu_ops.THREADS_ENV, "2")
    g = torch.Generator().manual_seed(rows * n_out + K)
    x = torch.randn(rows, K, generator=g).bfloat16()
    w = torch.randn(n_out, K, generator=g).bfloat16()
    b = torch.randn(n_out, generator=g).bfloat16()
    y32 = torch.empty(rows, n_out)
    y16 = torch.empty(rows, n_out, dtype=torch.bfloat16)
    for y, as_bf16 in ((y32, 0), (y16, 1)):
        assert lib.gptoss_linear_bf16(x.data_ptr(), rows, K, w.data_ptr(), n_out, b.data_ptr(), y.data_ptr(),
                                      as_bf16, 2) == 0
    assert torch.equal(y16, y32.to(torch.bfloat16))
    assert rel_err(y32, x.float() @ w.float().T + b.float()) < 1e-5


def test_native_argmax_rows_is_torchs():
    """A batch's greedy tokens from the library: torch.argmax's answers, the first of equal
    maxima (in one vector lane and across lanes), the first NaN, all -inf, short rows."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1000, generator=g)
    x[0, 50] = x[0, 70] = x[0, 990] = 100.0      # lanes 2, 6, 14: the first wins
    x[1, 20] = x[1, 36] = 100.0                  # one lane
    x[2, 3] = x[2, 900] = float("nan")
    x[3, 999] = float("nan")                     # in the tail after the vector loop
    x[4] = float("-inf")
    x[5, 997] = 100.0
    assert cpu_ops.argmax_rows(x) == x.argmax(-1).tolist() == [50, 20, 3, 999, 0, 997]
    for shape in [(1, 5), (3, 16), (2, 17), (8, 201088)]:
        y = torch.randn(*shape, generator=g)
        assert cpu_ops.argmax_rows(y) == y.argmax(-1).tolist(), shape


def test_ctrl_c_at_20b_shapes_stops_within_one_token(monkeypatch):
    """gpt-oss-20b's real shapes (one of its 24 layers, bf16) on CPU: a SIGINT in the middle of a
    reply raises KeyboardInterrupt before a second token comes out (each native call returns
    within a step: the handler runs as soon as it does), and the engine then answers as a fresh
    one would. Counted in tokens, not timed."""
    import os
    import signal
    import threading
    import time

    from gptoss_cli.config import PRESETS
    from gptoss_cli.engine import Engine

    monkeypatch.setenv(cpu_ops.THREADS_ENV, "2")
    eng = Engine.random(PRESETS["gpt-oss-20b"].replace(n_layers=1), device="cpu", dtype="bfloat16",
                        max_context=256)
    prompt = list(range(1000, 1040))
    got: list[int] = []
    at_signal: list[int] = []

    def interrupt(delay: float) -> None:
        time.sleep(delay)
        at_signal.append(len(got))
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        t_last = None
        for tok in eng.generate(prompt, max_new_tokens=200, temperature=0):
            got.append(tok)
            now = time.perf_counter()
            if len(got) == 3:   # mid-step: half a step after this token
                threading.Thread(target=interrupt, args=(0.5 * (now - t_last),), daemon=True).start()
            t_last = now
            assert len(got) < 150, "the SIGINT never arrived"
    assert at_signal and len(got) - at_signal[0] <= 1
    again = list(eng.generate(prompt + [7, 8], max_new_tokens=4, temperature=0))
    eng._reset()
    assert again == list(eng.generate(prompt + [7, 8], max_new_tokens=4, temperature=0))

def _attn_args(layout, B, T, H, K, dh, window, dtype, seed, S=40, start=25):
    """Arguments of ``ops.attention`` as the model passes them: q a view into a qkv projection;
    ``full``: k, v the first S slots of a bigger cache buffer, slot n at position n, stale slots past
    the queries; ``ring``: S slots holding the last S-6 positions in a shuffled order, 6 empty."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * K) * dh, generator=g).to(dtype)
    q = qkv[..., : H * dh].view(B, T, H, dh)                                 # [B, T, H, dh], strided
    q_pos = torch.arange(start, start + T)
    if layout == "full":
        buf_k, buf_v = (torch.randn(B, S + 9, K, dh, generator=g).to(dtype) for _ in range(2))
        k, v, k_pos = buf_k[:, :S], buf_v[:, :S], torch.arange(S)
    else:
        k, v = (torch.randn(B, S, K, dh, generator=g).to(dtype) for _ in range(2))
        k_pos = torch.full((S,), -1, dtype=torch.long)
        k_pos[torch.randperm(S, generator=g)[:S - 6]] = torch.arange(start + T - S + 6, start + T)
    sinks = torch.randn(H, generator=g) * 2
    return q, k, v, sinks, q_pos, k_pos, window, dh ** -0.5, layout == "full"


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("window", [0, 8])
@pytest.mark.parametrize("layout", ["full", "ring"])
@pytest.mark.parametrize("B,H,K,dh,threads", [(1, 8, 2, 64, 1), (2, 8, 2, 64, 3), (2, 4, 4, 24, 3), (1, 4, 4, 24, 1)])
def test_native_attention_matches_reference(monkeypatch, dtype, T, window, layout, B, H, K, dh, threads):
    monkeypatch.setenv(cpu_ops.THREADS_ENV, str(threads))
    args = _attn_args(layout, B, T, H, K, dh, window, dtype, seed=T * 13 + window + dh + B)
    q = args[0]
    assert q.untyped_storage().nbytes() > q.numel() * q.element_size()      # a view of qkv, as in the model
    ref_o = ops.attention.reference(*args)
    cpu_o = cpu_ops.attention(*args)
    assert cpu_o.shape == (B, T, H, dh) and cpu_o.dtype == dtype
    assert rel_err(cpu_o, ref_o) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout,window", [("full", 0), ("full", 300), ("ring", 0)])
def test_native_attention_split_over_threads(monkeypatch, dtype, layout, window):
    """Enough keys that the library starts its threads (about 1M multiply-adds each): 20 work
    items (batch, kv head, token) split 6/7/7 over 3 threads (2 with the window)."""
    monkeypatch.setenv(cpu_ops.THREADS_ENV, "3")
    args = _attn_args(layout, 2, 5, 8, 2, 64, window, dtype, seed=window + 1, S=1100, start=1050)
    ref_o, cpu_o = ops.attention.reference(*args), cpu_ops.attention(*args)
    assert rel_err(cpu_o, ref_o) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [0, 8])
@pytest.mark.parametrize("dh", [64, 24])
def test_native_attention_lonely_and_empty_queries(dtype, window, dh):
    """Query 0 sees only its own key (every other slot is empty or out of its window: all of the
    softmax but the sink is one key), query 1 sees nothing at all (only the sink: output 0)."""
    g = torch.Generator().manual_seed(dh + window)
    B, H, K, S = 2, 8, 2, 24
    q = torch.randn(B, 2, H, dh, generator=g).to(dtype)
    k, v = (torch.randn(B, S, K, dh, generator=g).to(dtype) for _ in range(2))
    k_pos = torch.full((S,), -1, dtype=torch.long)
    k_pos[5], k_pos[9] = 50, 60                       # query at 50 sees slot 5 only; 60 is its future
    if window:
        k_pos[11] = 50 - window                       # just outside the window
    args = (q, k, v, torch.randn(H, generator=g), torch.tensor([50, 40]), k_pos, window, dh ** -0.5)
    ref_o, cpu_o = ops.attention.reference(*args), cpu_ops.attention(*args)
    assert rel_err(cpu_o, ref_o) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(cpu_o[:, 1], torch.zeros_like(cpu_o[:, 1]))


def test_native_attention_leaves_prefill_and_fp16_to_the_reference(monkeypatch):
    """More than ATTN_MAX_ROWS tokens, or a dtype the library does not take: the reference's own result."""
    calls = []
    monkeypatch.setattr(cpu_ops._library()[0], "gptoss_attention", lambda *a: calls.append(1))
    for T, dtype in ((cpu_ops.ATTN_MAX_ROWS + 1, torch.float32), (2, torch.float16)):
        args = _attn_args("full", 1, T, 8, 2, 16, 0, dtype, seed=T)
        assert torch.equal(cpu_ops.attention(*args), ops.attention.reference(*args))
    assert calls == []


@pytest.mark.parametrize("op", ["moe", "attention"])
def test_ops_dispatch_cpu_tensors_to_native(monkeypatch, op):
    """auto: ``ops.moe`` and ``ops.attention`` on CPU run the native library; GPTOSS_KERNELS=0:
    the references, bit for bit."""
    args = (_args(5, 8, 64, 64, 4, torch.float32) if op == "moe"
            else _attn_args("ring", 2, 1, 8, 2, 64, 8, torch.float32, seed=3))
    dispatched, symbol = getattr(ops, op), f"gptoss_{op}"
    calls = []
    real = getattr(cpu_ops._library()[0], symbol)
    monkeypatch.setattr(cpu_ops._library()[0], symbol, lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv(ops.KERNELS_ENV, "auto")
    assert rel_err(dispatched(*args), dispatched.reference(*args)) < 1e-5 and calls == [1]
    monkeypatch.setenv(ops.KERNELS_ENV, "0")
    assert torch.equal(dispatched(*args), dispatched.reference(*args)) and calls == [1]


def test_worker_pool_serves_concurrent_callers_and_forked_children(monkeypatch):
    """The library keeps its worker threads between calls: two Python threads calling at once
    both get the reference's result, and a child forked after the pool started runs its own."""
    import os
    import threading

    monkeypatch.setenv(cpu_ops.THREADS_ENV, "2")
    args = _args(150, 8, 96, 64, 4, torch.float32)    # enough work that both threads start
    want = ops.moe.reference(*args)
    got = {}

    def call(i):
        got[i] = [rel_err(cpu_ops.moe(*args), want) for _ in range(5)]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(max(got[i]) < 1e-5 for i in range(2)), got
    pid = os.fork()
    if pid == 0:                                     # the child: exit 0 only if the call is right
        try:
            torch.set_num_threads(1)    # PyTorch's OpenMP hangs in a child once the parent used it
            os._exit(0 if rel_err(cpu_ops.moe(*args), want) < 1e-5 else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("the forked child hung in the library")
    assert os.waitstatus_to_exitcode(status) == 0

def _rope_args(layout, B, T, H, K, dh, dtype, bias, seed, S=24, start=30):
    """Arguments of ``ops.rope_store`` as the model passes them: q, k, v views of one qkv
    projection; ``full``: slots = positions of a cache of S slots; ``ring``: S slots, slot pos mod S."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * K) * dh, generator=g).to(dtype)
    q, k, v = qkv.split((H * dh, K * dh, K * dh), dim=-1)
    q, k, v = q.view(B, T, H, dh), k.view(B, T, K, dh), v.view(B, T, K, dh)  # strided views
    cos, sin = ops.rope_table(start + T + 5, dh, 150000.0, 32.0, 4096, 32.0, 1.0, 1.0 + 0.1 * 3.4657)
    pos = torch.arange(start, start + T)
    k_cache, v_cache = (torch.randn(B, S if layout == "ring" else start + T + 3, K, dh, generator=g).to(dtype)
                        for _ in range(2))
    ring_pos = torch.full((S,), -1, dtype=torch.long) if layout == "ring" else None
    slots = None if layout == "ring" else pos.clone()
    qkv_bias = torch.randn((H + 2 * K) * dh, generator=g).to(dtype) if bias else None
    return q, k, v, cos, sin, pos, k_cache, v_cache, slots, ring_pos, qkv_bias


def _clone_state(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("layout", ["full", "ring"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("B,H,K,dh", [(1, 8, 2, 64), (2, 8, 2, 16), (2, 4, 4, 64)])
def test_native_rope_store_matches_reference(dtype, T, layout, bias, B, H, K, dh):
    args = _rope_args(layout, B, T, H, K, dh, dtype, bias, seed=T * 7 + dh + B + bias)
    assert args[0].untyped_storage().nbytes() > args[0].numel() * args[0].element_size()
    ref_args, cpu_args = _clone_state(args), _clone_state(args)
    ref_q = ops.rope_store.reference(*ref_args)
    cpu_q = cpu_ops.rope_store(*cpu_args)
    assert cpu_q.shape == (B, T, H, dh) and cpu_q.dtype == dtype and cpu_q.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(cpu_q, ref_q) < tol
    written = (cpu_args[5] % cpu_args[6].shape[1]) if layout == "ring" else cpu_args[8]
    untouched = torch.ones(cpu_args[6].shape[1], dtype=torch.bool)
    untouched[written] = False
    for i in (6, 7):                                                         # k_cache, v_cache
        assert rel_err(cpu_args[i][:, written], ref_args[i][:, written]) < tol
        assert torch.equal(cpu_args[i][:, untouched], args[i][:, untouched])
    assert torch.equal(cpu_args[7][:, written], ref_args[7][:, written])    # v: one add at most
    if layout == "ring":
        assert torch.equal(cpu_args[9], ref_args[9])


def test_native_rope_store_leaves_prefill_to_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_ops._library()[0], "gptoss_rope_store", lambda *a: calls.append(1))
    args = _rope_args("full", 1, cpu_ops.SMALL_MAX_ROWS + 1, 8, 2, 16, torch.float32, True, seed=1)
    ref_args, cpu_args = _clone_state(args), _clone_state(args)
    assert torch.equal(cpu_ops.rope_store(*cpu_args), ops.rope_store.reference(*ref_args))
    assert torch.equal(cpu_args[6], ref_args[6]) and calls == []


def test_native_rope_store_rejects_positions_past_the_table():
    args = list(_rope_args("full", 1, 1, 8, 2, 16, torch.float32, False, seed=2))
    args[5] = args[5] + 1000
    with pytest.raises(ValueError, match="rope_store"):
        cpu_ops.rope_store(*args)


def _norm_args(B, T, D, E, top_k, dtype, bias, seed):
    """Arguments of ``ops.add_rmsnorm_route`` as the model passes them: x, delta [B, T, D] in the
    activation dtype, the norm scale float32, the router and the attention's output bias in the
    activation dtype."""
    g = torch.Generator().manual_seed(seed)
    x, delta = (torch.randn(B, T, D, generator=g).to(dtype) for _ in range(2))
    scale = 1 + 0.1 * torch.randn(D, generator=g)
    router_w = (torch.randn(E, D, generator=g) * D ** -0.5).to(dtype)
    router_b = (0.1 * torch.randn(E, generator=g)).to(dtype)
    delta_bias = (0.1 * torch.randn(D, generator=g)).to(dtype) if bias else None
    return x, delta, scale, 1e-5, router_w, router_b, top_k, delta_bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T", [(1, 1), (1, 3), (2, 3), (1, 16)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("D,E,top_k", [(2880, 32, 4), (96, 8, 2), (40, 32, 4)])
def test_native_add_rmsnorm_route_matches_reference(dtype, B, T, bias, D, E, top_k):
    args = _norm_args(B, T, D, E, top_k, dtype, bias, seed=B * 5 + T + D + E + bias)
    ref_x, ref_h, (ref_w, ref_e) = ops.add_rmsnorm_route.reference(*args)
    cpu_x, cpu_h, (cpu_w, cpu_e) = cpu_ops.add_rmsnorm_route(*args)
    assert cpu_x.shape == cpu_h.shape == (B, T, D) and cpu_x.dtype == cpu_h.dtype == dtype
    assert cpu_w.dtype == torch.float32 and cpu_e.dtype == torch.int64 and cpu_e.shape == (B * T, top_k)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.equal(cpu_x, ref_x)                                         # one add (two with the bias)
    assert rel_err(cpu_h, ref_h) < tol
    assert torch.equal(cpu_e, ref_e)                                         # the same experts, same order
    assert rel_err(cpu_w, ref_w) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 3), (1, 16)])
def test_native_add_rmsnorm_and_rmsnorm_match_reference(dtype, B, T):
    x, delta, scale, eps = _norm_args(B, T, 2880, 8, 2, dtype, False, seed=B + T)[:4]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    ref_x, ref_h = ops.add_rmsnorm.reference(x, delta, scale, eps)
    cpu_x, cpu_h = cpu_ops.add_rmsnorm(x, delta, scale, eps)
    assert torch.equal(cpu_x, ref_x) and rel_err(cpu_h, ref_h) < tol and cpu_h.dtype == dtype
    cpu_n = cpu_ops.rmsnorm(x, scale, eps)
    assert cpu_n.shape == x.shape and rel_err(cpu_n, ops.rmsnorm.reference(x, scale, eps)) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("E,top_k", [(8, 2), (32, 4), (256, 4)])
def test_native_route_breaks_ties_as_torch_topk(dtype, E, top_k):
    """Router rows built so that the logits tie exactly (copies of one weight row, zero bias):
    the same experts as torch.topk on CPU, in its order. That order is not "lower index first"
    (torch.topk uses std::nth_element or std::partial_sort, which are not stable): here it
    gives the higher index first, so the library runs the same std algorithms."""
    x, delta, scale, eps, router_w, _, _, _ = _norm_args(1, 3, 64, E, top_k, dtype, False, seed=E)
    coef = torch.tensor([2.0, -2.0, 1.0])[torch.arange(E) % 3]   # powers of two: exact ties
    router_w = (coef[:, None] * router_w[0].float()).to(dtype)                # [E, D], rows tie
    router_b = torch.zeros(E, dtype=dtype)
    ref = ops.add_rmsnorm_route.reference(x, delta, scale, eps, router_w, router_b, top_k)[2]
    cpu = cpu_ops.add_rmsnorm_route(x, delta, scale, eps, router_w, router_b, top_k)[2]
    assert torch.equal(cpu[1], ref[1]) and rel_err(cpu[0], ref[0]) < 1e-5
    h = cpu_ops.add_rmsnorm(x, delta, scale, eps)[1].reshape(3, 64)
    logits = ops.linear.reference(h, router_w, router_b)                      # [3, E]
    for row in range(3):
        chosen = logits[row][cpu[1][row]]
        assert torch.equal(chosen, logits[row].topk(top_k).values)            # the top values, descending
        assert (logits[row] == chosen[-1]).sum() > (chosen == chosen[-1]).sum()  # a tie was cut


def test_native_norms_leave_prefill_and_fp16_to_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_ops._library()[0], "gptoss_add_rmsnorm", lambda *a: calls.append(1))
    prefill = _norm_args(1, cpu_ops.SMALL_MAX_ROWS + 1, 64, 8, 2, torch.float32, True, seed=3)
    half = tuple(t.half() if isinstance(t, torch.Tensor) and i != 2 else t
                 for i, t in enumerate(_norm_args(1, 1, 64, 8, 2, torch.float32, True, seed=4)))
    for args in (prefill, half):
        ref, got = ops.add_rmsnorm_route.reference(*args), cpu_ops.add_rmsnorm_route(*args)
        assert all(torch.equal(a, b) for a, b in zip((*ref[:2], *ref[2]), (*got[:2], *got[2])))
    assert calls == []


def test_ops_small_ops_dispatch_cpu_tensors_to_native(monkeypatch):
    """auto: ``ops.rope_store``, ``ops.rmsnorm``, ``ops.add_rmsnorm``, ``ops.add_rmsnorm_route`` on
    CPU run the library; GPTOSS_KERNELS=0: the references, bit for bit."""
    lib = cpu_ops._library()[0]
    calls = []
    for name in ("gptoss_rope_store", "gptoss_add_rmsnorm"):
        real = getattr(lib, name)
        monkeypatch.setattr(lib, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    rope = _rope_args("ring", 2, 1, 8, 2, 64, torch.bfloat16, True, seed=3)
    norm = _norm_args(1, 1, 2880, 32, 4, torch.bfloat16, True, seed=3)

    def run_all():
        args = _clone_state(rope)
        q = ops.rope_store(*args)
        return [q, args[6], args[7], args[9], ops.rmsnorm(norm[0], norm[2], norm[3]),
                *ops.add_rmsnorm(*norm[:4]), *ops.add_rmsnorm_route(*norm)[:2], *ops.add_rmsnorm_route(*norm)[2]]

    def run_refs():
        args = _clone_state(rope)
        q = ops.rope_store.reference(*args)
        return [q, args[6], args[7], args[9], ops.rmsnorm.reference(norm[0], norm[2], norm[3]),
                *ops.add_rmsnorm.reference(*norm[:4]), *ops.add_rmsnorm_route.reference(*norm)[:2],
                *ops.add_rmsnorm_route.reference(*norm)[2]]

    monkeypatch.setenv(ops.KERNELS_ENV, "auto")
    native, refs = run_all(), run_refs()
    assert calls == ["gptoss_rope_store"] + ["gptoss_add_rmsnorm"] * 4
    assert all(rel_err(a, b) < 1e-2 for a, b in zip(native, refs) if a.is_floating_point())
    assert torch.equal(native[-1], refs[-1])                                 # the same experts
    monkeypatch.setenv(ops.KERNELS_ENV, "0")
    assert all(torch.equal(a, b) for a, b in zip(run_all(), refs)) and len(calls) == 5


# ---- the batched decode step: attention_rows, rope_store_rows -------------------------------------
def _attn_rows_args(c):
    return (c["q"], c["k_cache"], c["v_cache"], c["sinks"], c["rows"], c["pos"], c["k_pos"], c["window"], c["scale"])


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout,window", [("full", 0), ("full", 8), ("ring", 16), ("ring", 8)])
@pytest.mark.parametrize("N,n_pad", [(1, 0), (3, 0), (8, 3), (64, 5)])
@pytest.mark.parametrize("H,K,dh,threads", [(8, 2, 64, 1), (8, 2, 64, 3), (4, 4, 24, 2)])
def test_native_attention_rows_matches_reference(monkeypatch, dtype, layout, window, N, n_pad, H, K, dh, threads):
    """Tokens of N sequences in their own cache rows (out of order, padding tokens on a scratch
    row), each at its own position: full caches with stale slots past it, rings wrapped or not."""
    monkeypatch.setenv(cpu_ops.THREADS_ENV, str(threads))
    c = rows_case(layout, N, n_pad, H, K, dh, window, dtype, "cpu", seed=N + n_pad + window + dh + threads)
    args = _attn_rows_args(c)
    assert args[0].untyped_storage().nbytes() > args[0].numel() * args[0].element_size()   # a view of qkv
    ref_o = ops.attention_rows.reference(*args)
    cpu_o = cpu_ops.attention_rows(*args)
    assert cpu_o.shape == (N, H, dh) and cpu_o.dtype == dtype
    assert rel_err(cpu_o, ref_o) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["full", "ring"])
def test_native_attention_rows_split_over_threads(monkeypatch, dtype, layout):
    """Enough keys that the threads start: 6 tokens x 2 kv heads over 3 threads, 1000+ keys."""
    monkeypatch.setenv(cpu_ops.THREADS_ENV, "3")
    c = rows_case(layout, 6, 1, 8, 2, 64, 0, dtype, "cpu", seed=11, S=1200, ring=1024)
    args = _attn_rows_args(c)
    assert rel_err(cpu_ops.attention_rows(*args), ops.attention_rows.reference(*args)) < \
        (1e-5 if dtype == torch.float32 else 1e-2)


def _rope_rows_args(layout, N, n_pad, H, K, dh, dtype, bias, seed):
    c = rows_case(layout, N, n_pad, H, K, dh, 0, dtype, "cpu", seed=seed, S=48, ring=16)
    g = torch.Generator().manual_seed(seed)
    cos, sin = ops.rope_table(200, dh, 150000.0, 32.0, 4096, 32.0, 1.0, 1.0 + 0.1 * 3.4657)
    table = torch.full(c["k_cache"].shape[:2], -1, dtype=torch.long) if layout == "ring" else None
    qkv_bias = torch.randn((H + 2 * K) * dh, generator=g).to(dtype) if bias else None
    return (c["q"], c["k"], c["v"], cos, sin, c["rows"], c["pos"], c["k_cache"], c["v_cache"], table, qkv_bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["full", "ring"])
@pytest.mark.parametrize("N,n_pad", [(1, 0), (3, 0), (8, 3), (64, 2)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("H,K,dh", [(8, 2, 64), (4, 4, 16)])
def test_native_rope_store_rows_matches_reference(dtype, layout, N, n_pad, bias, H, K, dh):
    """Same roundings as the reference: q, the cache writes and the ring's table to the bit; the
    slots not written left alone. Row 0 is the padding tokens' scratch row (last writer wins)."""
    args = _rope_rows_args(layout, N, n_pad, H, K, dh, dtype, bias, seed=N * 3 + n_pad + dh + bias)
    ref_args, cpu_args = _clone_state(args), _clone_state(args)
    ref_q = ops.rope_store_rows.reference(*ref_args)
    cpu_q = cpu_ops.rope_store_rows(*cpu_args)
    n_real = N - n_pad
    assert cpu_q.shape == (N, H, dh) and cpu_q.dtype == dtype and cpu_q.is_contiguous()
    assert torch.equal(cpu_q[:n_real], ref_q[:n_real])
    for i in (7, 8, 9) if layout == "ring" else (7, 8):                     # k_cache, v_cache, ring table
        assert torch.equal(cpu_args[i][1:], ref_args[i][1:])
    assert torch.equal(cpu_args[7][1:] != args[7][1:], ref_args[7][1:] != args[7][1:])


def test_native_rows_ops_leave_big_batches_and_fp16_to_the_reference(monkeypatch):
    """More than ROWS_MAX_TOKENS tokens, or fp16: the references' own results, no library call."""
    calls = []
    lib = cpu_ops._library()[0]
    monkeypatch.setattr(lib, "gptoss_attention_rows", lambda *a: calls.append(1))
    monkeypatch.setattr(lib, "gptoss_rope_store_rows", lambda *a: calls.append(1))
    for N, dtype in ((cpu_ops.ROWS_MAX_TOKENS + 1, torch.float32), (2, torch.float16)):
        c = rows_case("ring", N, 0, 4, 2, 16, 0, dtype, "cpu", seed=N, S=16)
        args = _attn_rows_args(c)
        assert torch.equal(cpu_ops.attention_rows(*args), ops.attention_rows.reference(*args))
        rope = _rope_rows_args("full", N, 0, 4, 2, 16, dtype, True, seed=N)
        ref_args, cpu_args = _clone_state(rope), _clone_state(rope)
        assert torch.equal(cpu_ops.rope_store_rows(*cpu_args), ops.rope_store_rows.reference(*ref_args))
    assert calls == []


def test_native_rope_store_rows_rejects_bad_rows_and_positions():
    args = _rope_rows_args("full", 3, 0, 4, 2, 16, torch.float32, False, seed=1)
    for i, bad in ((6, torch.tensor([0, 1, 48])), (5, torch.tensor([0, 1, 9]))):   # pos past the cache; row
        wrong = list(_clone_state(args))
        wrong[i] = bad
        with pytest.raises(ValueError, match="rope_store_rows"):
            cpu_ops.rope_store_rows(*wrong)


def test_ops_rows_ops_dispatch_cpu_tensors_to_native(monkeypatch):
    """auto: ``ops.attention_rows`` and ``ops.rope_store_rows`` on CPU run the library;
    GPTOSS_KERNELS=0: the references."""
    lib = cpu_ops._library()[0]
    calls = []
    for name in ("gptoss_attention_rows", "gptoss_rope_store_rows"):
        real = getattr(lib, name)
        monkeypatch.setattr(lib, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    c = rows_case("ring", 3, 1, 8, 2, 64, 16, torch.float32, "cpu", seed=5)
    rope = _rope_rows_args("ring", 3, 1, 8, 2, 64, torch.float32, True, seed=5)
    ops.attention_rows(*_attn_rows_args(c))
    ops.rope_store_rows(*_clone_state(rope))
    assert calls == ["gptoss_attention_rows", "gptoss_rope_store_rows"]
    monkeypatch.setenv(ops.KERNELS_ENV, "0")
    ops.attention_rows(*_attn_rows_args(c))
    ops.rope_store_rows(*_clone_state(rope))
    assert len(calls) == 2


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="elsewhere the native build is the portable one")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_portable_build_without_avx512_matches_reference(monkeypatch, tmp_path, dtype):
    """Most CPUs people own have no AVX-512: the library built for plain x86-64 (the portable
    loops) gives the references' results too, for every op."""
    monkeypatch.setattr(cpu_ops, "FLAGS", tuple("-march=x86-64" if f == "-march=native" else f
                                                 for f in cpu_ops.FLAGS))
    monkeypatch.setenv(cpu_ops.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(cpu_ops.THREADS_ENV, "2")
    cpu_ops._library.cache_clear()
    try:
        assert cpu_ops.status() == "cpu-native (scalar)" and not cpu_ops.bf16_native()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for N in (1, 3, 150):
            args = _args(N, 8, 224, 160, 4, dtype)
            assert rel_err(cpu_ops.moe(*args), ops.moe.reference(*args)) < tol
        attn = _attn_args("ring", 2, 1, 8, 2, 64, 8, dtype, seed=4)
        assert rel_err(cpu_ops.attention(*attn), ops.attention.reference(*attn)) < tol
        rope = _rope_args("ring", 1, 3, 8, 2, 64, dtype, True, seed=5)
        ref_args, cpu_args = _clone_state(rope), _clone_state(rope)
        assert rel_err(cpu_ops.rope_store(*cpu_args), ops.rope_store.reference(*ref_args)) < tol
        rows = _attn_rows_args(rows_case("ring", 4, 1, 8, 2, 64, 8, dtype, "cpu", seed=7))
        assert rel_err(cpu_ops.attention_rows(*rows), ops.attention_rows.reference(*rows)) < tol
        rows = _attn_rows_args(rows_case("full", 4, 1, 8, 2, 64, 0, dtype, "cpu", seed=8))
        assert rel_err(cpu_ops.attention_rows(*rows), ops.attention_rows.reference(*rows)) < tol
        rope = _rope_rows_args("ring", 4, 1, 8, 2, 64, dtype, True, seed=9)
        ref_args, cpu_args = _clone_state(rope), _clone_state(rope)
        assert torch.equal(cpu_ops.rope_store_rows(*cpu_args)[:3], ops.rope_store_rows.reference(*ref_args)[:3])
        assert torch.equal(cpu_args[7][1:], ref_args[7][1:]) and torch.equal(cpu_args[9], ref_args[9])
        norm = _norm_args(1, 3, 96, 8, 2, dtype, True, seed=6)
        ref_x, ref_h, (ref_w, ref_e) = ops.add_rmsnorm_route.reference(*norm)
        cpu_x, cpu_h, (cpu_w, cpu_e) = cpu_ops.add_rmsnorm_route(*norm)
        assert torch.equal(cpu_x, ref_x) and rel_err(cpu_h, ref_h) < tol and torch.equal(cpu_e, ref_e)
        if dtype == torch.bfloat16:
            x, w = torch.randn(1, 3, 96).bfloat16(), (torch.randn(40, 96) / 10).bfloat16()
            assert rel_err(ops.linear(x, w), ops.linear.reference(x, w)) < 8e-3
    finally:
        cpu_ops._library.cache_clear()

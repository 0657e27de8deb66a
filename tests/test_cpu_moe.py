"""The native CPU MoE (``cpu_moe``, C++ at first use) against the reference ``ops.moe.reference``.

Sizes are multiples of 32 (an MXFP4 block) but not of the library's tiles (4 rows, 4 tokens),
and thread counts split the rows unevenly; token counts cover decode (1-8) and prefill (150),
with experts that get no token, one, and many. The fallback when no compiler can build it is
tested too: it must say so and still give the reference's result.
"""

from __future__ import annotations

import pytest
import torch
from kernels_util import rel_err

from gptoss_cli import cpu_moe, ops
from gptoss_cli.errors import GptossError


def _weights(E: int, D: int, F: int, dtype, seed: int):
    """Random router and MXFP4 experts: codes uniform, scales near 2^-3 (values of order one)."""
    g = torch.Generator().manual_seed(seed)
    w = {
        "router_w": torch.randn(E, D, generator=g) / D ** 0.5,
        "router_b": torch.randn(E, generator=g) * 0.1,
        "w1_blocks": torch.randint(0, 256, (E, 2 * F, D // 32, 16), generator=g, dtype=torch.uint8),
        "w1_scales": torch.randint(121, 125, (E, 2 * F, D // 32), generator=g, dtype=torch.uint8),
        "w1_bias": torch.randn(E, 2 * F, generator=g),
        "w2_blocks": torch.randint(0, 256, (E, D, F // 32, 16), generator=g, dtype=torch.uint8),
        "w2_scales": torch.randint(121, 125, (E, D, F // 32), generator=g, dtype=torch.uint8),
        "w2_bias": torch.randn(E, D, generator=g),
    }
    return {k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in w.items()}


def _args(N, E, D, F, top_k, dtype):
    w = _weights(E, D, F, dtype, seed=N * 7 + E)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(N)).to(dtype)
    return (x, *w.values(), top_k, 7.0)


@pytest.fixture(autouse=True)
def native_only():
    if cpu_moe.status().startswith("pytorch-reference"):
        pytest.fail(f"the native CPU MoE did not build here: {cpu_moe.status()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [1, 3, 8, 9, 150])
@pytest.mark.parametrize("E,D,F,top_k,threads", [(8, 224, 160, 4, 3), (4, 64, 32, 2, 1), (32, 96, 96, 4, 2)])
def test_native_moe_matches_reference(monkeypatch, dtype, N, E, D, F, top_k, threads):
    monkeypatch.setenv(cpu_moe.THREADS_ENV, str(threads))
    args = _args(N, E, D, F, top_k, dtype)
    ref_y = ops.moe.reference(*args)
    cpu_y = cpu_moe.moe(*args)
    assert cpu_y.shape == (N, D) and cpu_y.dtype == dtype
    assert rel_err(cpu_y, ref_y) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_ops_moe_dispatches_cpu_tensors_to_native(monkeypatch):
    """auto: ``ops.moe`` on CPU runs the native library; GPTOSS_KERNELS=0: the reference, bit for bit."""
    args = _args(5, 8, 64, 64, 4, torch.float32)
    calls = []
    real = cpu_moe._library()[0].gptoss_moe
    monkeypatch.setattr(cpu_moe._library()[0], "gptoss_moe", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv(ops.KERNELS_ENV, "auto")
    assert rel_err(ops.moe(*args), ops.moe.reference(*args)) < 1e-5 and calls == [1]
    monkeypatch.setenv(ops.KERNELS_ENV, "0")
    assert torch.equal(ops.moe(*args), ops.moe.reference(*args)) and calls == [1]


def test_no_compiler_falls_back_to_the_reference_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv(cpu_moe.CACHE_ENV, str(tmp_path / "cache"))
    cpu_moe._library.cache_clear()
    cpu_moe._warn_fallback.cache_clear()
    try:
        assert cpu_moe.status().startswith("pytorch-reference: building cpu_moe.cpp")
        args = _args(3, 8, 64, 64, 4, torch.float32)
        with pytest.warns(RuntimeWarning, match="slow PyTorch reference"):
            y = cpu_moe.moe(*args)
        assert torch.equal(y, ops.moe.reference(*args))
    finally:
        cpu_moe._library.cache_clear()
        cpu_moe._warn_fallback.cache_clear()


def test_thread_count(monkeypatch):
    monkeypatch.delenv(cpu_moe.THREADS_ENV, raising=False)
    assert cpu_moe.cpu_threads() >= 1
    monkeypatch.setenv(cpu_moe.THREADS_ENV, "3")
    assert cpu_moe.cpu_threads() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv(cpu_moe.THREADS_ENV, bad)
        with pytest.raises(GptossError, match="not a thread count"):
            cpu_moe.cpu_threads()

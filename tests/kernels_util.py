"""Helpers shared by the kernel tests (``tests/test_kernels_*.py``).

Without a GPU the kernels run under Triton's interpreter on CPU tensors (``conftest.py`` sets
``TRITON_INTERPRET=1``). The interpreter's ``tl.dot`` of two bf16 tiles returns garbage (Triton
3.9), so bf16 is tested only on a real GPU; fp16 and fp32 run everywhere.
"""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def devices_and_dtypes(bf16: bool = True):
    """(device, dtype) cases: fp32 and fp16 on this machine's device; bf16 only on CUDA."""
    dev = "cuda" if HAS_CUDA else "cpu"
    cases = [pytest.param(dev, torch.float32, id=f"{dev}-fp32"), pytest.param(dev, torch.float16, id=f"{dev}-fp16")]
    if bf16:
        cases.append(pytest.param("cuda", torch.bfloat16, marks=cuda_only, id="cuda-bf16"))
    return cases


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32; NaN anywhere (an unwritten output) fails it."""
    a, b = a.float(), b.float()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN: a kernel that skips an element leaves a NaN behind."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _sentinel(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t
    return t.fill_(-7777 if t.dtype != torch.uint8 else 0xAB)


@pytest.fixture(autouse=False)
def poison_allocations(monkeypatch):
    """Every ``torch.empty``/``empty_like`` made during the test comes filled with NaN (floats)
    or a sentinel (ints), so a kernel output element that is never written shows up."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _sentinel(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _sentinel(empty_like(*a, **k)))


def moe_weights(E: int, D: int, F: int, dtype, device, seed: int):
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
    return {k: v.to(device, dtype if v.dtype == torch.float32 else v.dtype) for k, v in w.items()}

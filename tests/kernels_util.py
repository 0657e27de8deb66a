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


def rows_case(layout: str, N: int, n_pad: int, H: int, K: int, dh: int, window: int, dtype, device, seed: int,
              S: int = 40, ring: int = 16):
    """Inputs of ``ops.attention_rows`` / ``ops.rope_store_rows`` as a batched decode step has
    them: N tokens, the first N - n_pad real sequences in cache rows out of order (a permutation
    of 1 .. N - n_pad), the last n_pad padding tokens that all point at scratch row 0, position 0.

    ``full``: a cache of S slots, each real sequence at its own position (one at 0, one at S-1);
    ``ring``: ``ring`` slots, positions past the ring's length (wrapped) and one not yet full;
    k_pos [B, ring] the table as it is after this step's write (slot pos mod ring holds pos).
    Returns a dict: q, k, v (views of one qkv projection), k_cache, v_cache, rows, pos, k_pos
    (None for full), sinks, window, scale, n_real."""
    g = torch.Generator().manual_seed(seed)
    n_real = N - n_pad
    B = n_real + 1
    rows = torch.cat((torch.randperm(n_real, generator=g) + 1, torch.zeros(n_pad, dtype=torch.long)))
    slots = S if layout == "full" else ring
    if layout == "full":
        pos = torch.randint(0, S, (n_real,), generator=g)
        pos[0] = S - 1
        if n_real > 1:
            pos[1] = 0
    else:
        pos = torch.randint(ring, 5 * ring, (n_real,), generator=g)
        if n_real > 1:
            pos[1] = ring // 2 - 1                       # not yet wrapped: some slots empty
    pos = torch.cat((pos, torch.zeros(n_pad, dtype=torch.long)))
    k_pos = None
    if layout == "ring":
        k_pos = torch.full((B, ring), -1, dtype=torch.long)
        for n in range(N):
            held = torch.arange(max(0, int(pos[n]) - ring + 1), int(pos[n]) + 1)
            k_pos[rows[n], held % ring] = held
    qkv = torch.randn(N, (H + 2 * K) * dh, generator=g).to(dtype)
    q, k, v = qkv.split((H * dh, K * dh, K * dh), dim=-1)
    k_cache, v_cache = (torch.randn(B, slots, K, dh, generator=g).to(dtype) for _ in range(2))
    out = {"q": q.view(N, H, dh), "k": k.view(N, K, dh), "v": v.view(N, K, dh),
           "k_cache": k_cache, "v_cache": v_cache, "rows": rows, "pos": pos, "k_pos": k_pos,
           "sinks": torch.randn(H, generator=g) * 2, "window": window, "scale": dh ** -0.5, "n_real": n_real}
    return {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in out.items()}

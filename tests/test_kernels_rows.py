"""The batched-decode kernels (``attention_rows``, ``rope_store_rows``) against their references
(TRITON_INTERPRET=1 without a GPU): N tokens of N sequences, each in its own row of a pooled cache
at its own position. Cases: N 1, 3, 8; rows out of order; padding tokens that all point at one
scratch row; full caches (positions 0 .. S-1 side by side, stale slots past each position) and
rings (wrapped, and not yet full), window on and off, GQA ratios 2 and 8.
"""

from __future__ import annotations

import pytest
import torch
from gptoss_kernels import attention as attn
from gptoss_kernels import rope
from kernels_util import devices_and_dtypes, poison_allocations, rel_err, rows_case  # noqa: F401

from gptoss_cli import ops

pytestmark = pytest.mark.usefixtures("poison_allocations")

ROWS = [(1, 0), (3, 0), (8, 0), (8, 3)]     # N tokens, of which padding


def _attn_args(c):
    return (c["q"], c["k_cache"], c["v_cache"], c["sinks"], c["rows"], c["pos"], c["k_pos"], c["window"], c["scale"])


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("layout,window", [("full", 0), ("full", 16), ("ring", 16), ("ring", 8)])
@pytest.mark.parametrize("N,n_pad", ROWS)
@pytest.mark.parametrize("H,K,dh", [(4, 2, 16), (8, 1, 32)])
def test_attention_rows(device, dtype, layout, window, N, n_pad, H, K, dh):
    c = rows_case(layout, N, n_pad, H, K, dh, window, dtype, device, seed=N * 7 + n_pad + window + H)
    args = _attn_args(c)
    ref_o = attn.attention_rows_torch(*args)
    tri_o = attn.attention_rows(*args)
    assert tri_o.shape == (N, H, dh) and tri_o.dtype == dtype
    assert rel_err(tri_o, ref_o) < (2e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(attn.attention_rows(*args), tri_o)       # counters back at zero, same bits


@pytest.mark.parametrize("device,dtype", devices_and_dtypes(bf16=False))
@pytest.mark.parametrize("layout", ["full", "ring"])
def test_attention_rows_long_cache_splits(device, dtype, layout, monkeypatch):
    """Few tokens over many slots: the keys split over programs, the last merges; a full cache's
    splits cover only each token's own live slots (one token at 3, one at 290 of 300)."""
    monkeypatch.setattr(attn, "DECODE_PROGRAMS", 32)
    c = rows_case(layout, 3, 1, 8, 2, 16, 0, dtype, device, seed=3, S=300, ring=96)
    if layout == "full":
        c["pos"][:2] = torch.tensor([3, 290], device=device)
    args = _attn_args(c)
    assert rel_err(attn.attention_rows(*args), attn.attention_rows_torch(*args)) < (2e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device,dtype", devices_and_dtypes(bf16=False) + [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")])
@pytest.mark.parametrize("layout", ["full", "ring"])
@pytest.mark.parametrize("N,n_pad", ROWS)
@pytest.mark.parametrize("bias", [False, True])
def test_rope_store_rows(device, dtype, layout, N, n_pad, bias):
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("the interpreter case")
    H, K, dh = 6, 3, 24                                          # dh/2 = 12: not a power of 2
    c = rows_case(layout, N, n_pad, H, K, dh, 0, dtype, device, seed=N + 3 * n_pad + bias, S=64, ring=16)
    g = torch.Generator().manual_seed(N)
    cos, sin = ops.rope_table(128, dh, 150000.0, 32.0, 4096, 1.0, 32.0, 1.35)
    cos, sin = cos.to(device), sin.to(device)
    qkv_b = torch.randn((H + 2 * K) * dh, generator=g).to(device, dtype) if bias else None
    table = None
    if layout == "ring":
        table = torch.full(c["k_cache"].shape[:2], -1, dtype=torch.long, device=device)
        table[1:, :3] = 5                                        # stale entries, overwritten or not
    ref_kc, ref_vc = c["k_cache"].clone(), c["v_cache"].clone()
    tri_kc, tri_vc = c["k_cache"].clone(), c["v_cache"].clone()
    ref_t = tri_t = None if table is None else table
    if table is not None:
        ref_t, tri_t = table.clone(), table.clone()
    common = (c["q"], c["k"], c["v"], cos, sin, c["rows"], c["pos"])
    ref_q = rope.rope_store_rows_torch(*common, ref_kc, ref_vc, ref_t, qkv_b)
    tri_q = rope.rope_store_rows(*common, tri_kc, tri_vc, tri_t, qkv_b)
    # row 0 is the padding tokens' scratch row: whichever of them writes last wins, nobody reads it
    real = slice(1, None)
    # a rounding of the dtype; the interpreter's casts to bf16 truncate (a bias add and the output:
    # up to 2 ulps at the largest values), the GPU's round to nearest
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 2e-2 if device == "cpu" else 8e-3}[dtype]
    assert rel_err(tri_q[:c["n_real"]], ref_q[:c["n_real"]]) < tol
    assert rel_err(tri_kc[real], ref_kc[real]) < tol and rel_err(tri_vc[real], ref_vc[real]) < tol
    if not (device == "cpu" and dtype == torch.bfloat16):
        assert torch.equal(tri_vc[real], ref_vc[real])                  # v: one add at most
    if table is not None:
        assert torch.equal(tri_t[real], ref_t[real])

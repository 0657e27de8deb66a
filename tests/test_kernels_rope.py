"""Fused RoPE + KV-cache write against ``ops.rope_store`` (TRITON_INTERPRET=1 without a GPU)."""

from __future__ import annotations

import pytest
import torch
from gptoss_kernels import rope
from kernels_util import devices_and_dtypes, poison_allocations, rel_err  # noqa: F401

from gptoss_cli import ops

pytestmark = pytest.mark.usefixtures("poison_allocations")


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("B,T,start,n_heads,n_kv_heads,d_head,slots", [
    (1, 1, 0, 4, 2, 16, "full"),      # first token
    (1, 1, 77, 64, 8, 64, "ring"),    # decode into a ring slot (gpt-oss head shape)
    (2, 21, 5, 4, 2, 16, "full"),     # prompt extending a prefix
    (1, 9, 40, 6, 3, 24, "ring"),     # 6 heads, dh/2 = 12: not powers of 2
    (2, 1, 77, 4, 2, 16, "ring_pos"),  # decode: the kernel finds the slot, updates the table
])
@pytest.mark.parametrize("bias", [False, True])                     # the qkv bias added on load
def test_rope_store(device, dtype, B, T, start, n_heads, n_kv_heads, d_head, slots, bias):
    g = torch.Generator().manual_seed(T + start)
    cos, sin = ops.rope_table(128, d_head, 150000.0, 32.0, 4096, 1.0, 32.0, 1.35)
    cos, sin = cos.to(device), sin.to(device)
    # q, k, v as the model has them: views into one [B, T, (H + 2K) dh] projection
    qkv = torch.randn(B, T, (n_heads + 2 * n_kv_heads) * d_head, generator=g).to(device, dtype)
    q, k, v = qkv.split((n_heads * d_head, n_kv_heads * d_head, n_kv_heads * d_head), dim=-1)
    q = q.view(B, T, n_heads, d_head)
    k = k.view(B, T, n_kv_heads, d_head)
    v = v.view(B, T, n_kv_heads, d_head)
    pos = torch.arange(start, start + T, device=device)
    S = 128 if slots == "full" else 16
    slot = pos if slots == "full" else torch.randperm(S, generator=g)[:T].to(device)
    ref_table = tri_table = None
    if slots == "ring_pos":
        slot, ref_table = None, torch.randint(-1, 50, (S,), generator=g).to(device)
        tri_table = ref_table.clone()
    # both caches start from the same random contents: slots not written must stay untouched
    cache0 = torch.randn(2, B, S, n_kv_heads, d_head, generator=g).to(device, dtype)
    ref_kc, ref_vc = cache0.clone()
    tri_kc, tri_vc = cache0.clone()
    qkv_b = torch.randn(qkv.shape[-1], generator=g).to(device, dtype) if bias else None
    ref_q = rope.rope_store_torch(q, k, v, cos, sin, pos, ref_kc, ref_vc, slot, ref_table, qkv_b)
    tri_q = rope.rope_store(q, k, v, cos, sin, pos, tri_kc, tri_vc, slot, tri_table, qkv_b)
    if ref_table is not None:
        assert torch.equal(tri_table, ref_table) and ref_table[77 % S] == 77
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    assert rel_err(tri_q, ref_q) < tol
    assert rel_err(tri_kc, ref_kc) < tol
    assert torch.equal(tri_vc, ref_vc)

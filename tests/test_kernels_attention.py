"""Sink-and-window attention kernel against ``ops.attention`` (TRITON_INTERPRET=1 without a GPU).

The cases are the ways the runtime calls it: a prompt over a full cache (from position 0 and
extending a cached prefix), one decode query over a full cache, over a ring buffer (slots out of
order, some empty), a prompt over ring + new keys, and the CUDA-graph decode (the whole
preallocated cache, stale keys beyond the query); window on and off; GQA ratios 1, 2, 8.
"""

from __future__ import annotations

import pytest
import torch
from gptoss_kernels import attention as attn
from kernels_util import devices_and_dtypes, poison_allocations, rel_err  # noqa: F401

pytestmark = pytest.mark.usefixtures("poison_allocations")


def _case(layout: str, T: int, start: int, window: int, ring: int, g: torch.Generator):
    """(q_pos, k_pos) for one way of calling attention."""
    q_pos = torch.arange(start, start + T)
    if layout == "full":                       # keys 0 .. start+T-1 in slot order
        k_pos = torch.arange(start + T)
    elif layout == "graph":                    # the whole buffer; slots past the query are stale
        k_pos = torch.arange(start + T + 23)
    elif layout == "ring":                     # ring of `ring` slots (slot = pos % ring), then the T new keys
        held = torch.arange(max(0, start - ring), start)
        k_ring = torch.full((ring,), -1, dtype=torch.long)
        k_ring[held % ring] = held
        k_pos = torch.cat((k_ring, q_pos)) if T > 1 else k_ring.index_put_((q_pos % ring,), q_pos)
    else:
        raise ValueError(layout)
    return q_pos, k_pos


CASES = [  # layout, T, start, window, ring
    ("full", 1, 0, 0, 0),        # the first token
    ("full", 37, 0, 0, 0),       # prefill from 0, T not a multiple of the block
    ("full", 37, 0, 16, 0),
    ("full", 70, 5, 0, 0),       # prompt extending a cached prefix of 5
    ("full", 70, 5, 16, 0),
    ("full", 1, 90, 0, 0),       # decode over a full cache
    ("full", 3, 90, 16, 0),
    ("graph", 1, 40, 0, 0),      # decode over the whole preallocated buffer
    ("graph", 1, 40, 16, 0),
    ("ring", 1, 7, 16, 16),      # decode, ring not yet full
    ("ring", 1, 53, 16, 16),     # decode, ring wrapped
    ("ring", 20, 53, 16, 16),    # prompt over ring + new keys
]


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("layout,T,start,window,ring", CASES)
@pytest.mark.parametrize("n_heads,n_kv_heads,d_head", [(4, 2, 16), (8, 1, 48)])
def test_attention(device, dtype, layout, T, start, window, ring, n_heads, n_kv_heads, d_head):
    g = torch.Generator().manual_seed(T * 131 + start * 7 + window + n_heads)
    q_pos, k_pos = _case(layout, T, start, window, ring, g)
    B, S = 2, k_pos.shape[0]
    q = torch.randn(B, T, n_heads, d_head, generator=g).to(device, dtype)
    k = torch.randn(B, S, n_kv_heads, d_head, generator=g).to(device, dtype)
    v = torch.randn(B, S, n_kv_heads, d_head, generator=g).to(device, dtype)
    sinks = (torch.randn(n_heads, generator=g) * 2).to(device)
    args = (q, k, v, sinks, q_pos.to(device), k_pos.to(device), window, d_head ** -0.5)
    ref_o = attn.attention_torch(*args)
    tri_o = attn.attention(*args)
    assert tri_o.shape == ref_o.shape and tri_o.dtype == dtype
    assert rel_err(tri_o, ref_o) < (2e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device,dtype", devices_and_dtypes(bf16=False))
@pytest.mark.parametrize("window", [0, 16])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 3)])
@pytest.mark.parametrize("by_pos", [False, True])
def test_attention_split_keys(device, dtype, window, B, T, by_pos, monkeypatch):
    """Decode-sized calls with the keys split over several programs, merged by the last one to
    finish (batch > 1 and several query tokens too: the partials are indexed by both); with
    ``keys_by_position`` the splits share out only the live keys (the rest of the buffer is
    stale, as in the CUDA-graph step). Twice each: the counters must be back at zero."""
    monkeypatch.setattr(attn, "DECODE_SPLIT_KEYS", 16)
    g = torch.Generator().manual_seed(window + B * 10 + T)
    S, H, K, dh = 75, 8, 2, 16
    q = torch.randn(B, T, H, dh, generator=g).to(device, dtype)
    k = torch.randn(B, S, K, dh, generator=g).to(device, dtype)
    v = torch.randn(B, S, K, dh, generator=g).to(device, dtype)
    sinks = torch.randn(H, generator=g).to(device)
    for p in (0, 31, 60):
        q_pos = torch.arange(p, p + T, device=device)
        args = (q, k, v, sinks, q_pos, torch.arange(S, device=device), window, 0.25, by_pos)
        ref_o, tri_o = attn.attention_torch(*args), attn.attention(*args)
        assert rel_err(tri_o, ref_o) < (2e-5 if dtype == torch.float32 else 1e-2)
        assert torch.equal(attn.attention(*args), tri_o)


def test_attention_strided_q(monkeypatch):
    """q as the model passes it: a view into the fused qkv projection (row stride > H*dh)."""
    g = torch.Generator().manual_seed(0)
    B, T, H, K, dh = 1, 9, 4, 2, 16
    qkv = torch.randn(B, T, (H + 2 * K) * dh, generator=g)
    q = qkv[..., : H * dh].view(B, T, H, dh)
    k = qkv[..., H * dh:(H + K) * dh].reshape(B, T, K, dh)
    v = qkv[..., (H + K) * dh:].reshape(B, T, K, dh)
    args = (q, k, v, torch.randn(H, generator=g), torch.arange(T), torch.arange(T), 0, 0.25)
    assert rel_err(attn.attention(*args), attn.attention_torch(*args)) < 2e-5

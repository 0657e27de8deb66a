"""MXFP4 MoE kernels (router, decode GEMVs, prefill grouped GEMMs) against ``ops.route``/``ops.moe``.

Under TRITON_INTERPRET=1 without a GPU. Sizes are multiples of 32 (an MXFP4 block) but not of the
kernels' 64-wide tiles; token counts cover the GEMV path (<= 4) and the grouped GEMM (> 4), with
experts that get no token, one token, and more than one tile of tokens. The bf16 decode GEMVs and
gpt-oss's own shapes: ``test_kernels_moe_decode.py``.
"""

from __future__ import annotations

import pytest
import torch
from gptoss_kernels import moe
from kernels_util import devices_and_dtypes, moe_weights, poison_allocations, rel_err  # noqa: F401

pytestmark = pytest.mark.usefixtures("poison_allocations")


@pytest.mark.parametrize("device,dtype", devices_and_dtypes(bf16=False))
@pytest.mark.parametrize("N,E,top_k", [(1, 8, 4), (13, 32, 4), (70, 5, 2)])
def test_route(device, dtype, N, E, top_k):
    w = moe_weights(E, 96, 32, dtype, device, seed=N)
    x = torch.randn(N, 96, generator=torch.Generator().manual_seed(N + 1)).to(device, dtype)
    ref_w, ref_e = moe.route_torch(x, w["router_w"], w["router_b"], top_k)
    tri_w, tri_e = moe.route(x, w["router_w"], w["router_b"], top_k)
    assert tri_e.dtype == torch.int64 and torch.equal(tri_e, ref_e)
    assert rel_err(tri_w, ref_w) < 1e-5


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("N", [1, 3, 4, 5, 150])       # GEMV: 1, 3, 4; grouped GEMM: 5, 150
@pytest.mark.parametrize("E,D,F,top_k", [(8, 96, 160, 4), (4, 64, 32, 2)])
def test_moe(device, dtype, N, E, D, F, top_k):
    w = moe_weights(E, D, F, dtype, device, seed=N * 7 + E)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(N)).to(device, dtype)
    args = (x, w["router_w"], w["router_b"], w["w1_blocks"], w["w1_scales"], w["w1_bias"],
            w["w2_blocks"], w["w2_scales"], w["w2_bias"], top_k, 7.0)
    ref_y = moe.moe_torch(*args)
    tri_y = moe.moe(*args)
    assert tri_y.shape == (N, D) and tri_y.dtype == dtype
    assert rel_err(tri_y, ref_y) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device,dtype", devices_and_dtypes(bf16=False))
@pytest.mark.parametrize("N,E,bias", [(1, 8, True), (3, 40, False), (70, 5, True)])  # fused (decode), not (prefill)
def test_add_rmsnorm_route(device, dtype, N, E, bias):
    w = moe_weights(E, 96, 32, dtype, device, seed=N + E)
    g = torch.Generator().manual_seed(N)
    x, delta = (torch.randn(N, 96, generator=g).to(device, dtype) for _ in range(2))
    scale = (1 + 0.1 * torch.randn(96, generator=g)).to(device)
    delta_bias = torch.randn(96, generator=g).to(device, dtype) if bias else None
    args = (x, delta, scale, 1e-5, w["router_w"], w["router_b"], 4 if E > 4 else 2, delta_bias)
    ref_x, ref_h, (ref_w, ref_e) = moe.add_rmsnorm_route_torch(*args)
    tri_x, tri_h, (tri_w, tri_e) = moe.add_rmsnorm_route(*args)
    assert torch.equal(tri_x, ref_x) and rel_err(tri_h, ref_h) < (1e-6 if dtype == torch.float32 else 2e-3)
    assert torch.equal(tri_e, ref_e) and rel_err(tri_w, ref_w) < 1e-5


@pytest.mark.parametrize("E", [8, 40])                 # one expert block a token, and several
def test_route_nan_gives_valid_experts(E):
    """A NaN in the router logits must not pick an expert id out of range (the GEMVs would read
    past the weights): the ids stay k distinct experts, finite logits first."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(E))
    w = torch.randn(E, 64, generator=torch.Generator().manual_seed(1)) / 8
    b = torch.zeros(E)
    w[2] = float("nan")                                # token rows: expert 2's logit is NaN
    x[1] = float("nan")                                # token 1: every logit is NaN
    weights, experts = moe.route(x, w, b, 4)
    assert ((experts >= 0) & (experts < E)).all()
    assert all(len(set(row)) == 4 for row in experts.tolist())
    assert 2 not in experts[0].tolist() and 2 not in experts[2].tolist()
    w_ref, b_ref = w.nan_to_num(0.0), b.clone()
    b_ref[2] = float("-inf")                           # what the NaN must count as
    ref_w, ref_e = moe.route_torch(x[[0, 2]], w_ref, b_ref, 4)
    assert torch.equal(experts[[0, 2]], ref_e) and rel_err(weights[[0, 2]], ref_w) < 1e-5
    assert not torch.isnan(weights).any()


def test_tiles_cover_every_pair_once():
    """The tile table: each sorted row in exactly one tile of its own expert, spare tiles -1."""
    experts = torch.tensor([[3, 0], [3, 1], [3, 0], [2, 3], [3, 1]])
    order, tile_expert, row0, row_end = moe._tiles(experts, 5, block_m=2)
    flat = experts.flatten()
    seen = []
    for e, r0, r1 in zip(tile_expert.tolist(), row0.tolist(), row_end.tolist()):
        if e < 0:
            continue
        rows = list(range(r0, min(r0 + 2, r1)))
        assert all(flat[order[r]].item() == e for r in rows)
        seen += rows
    assert sorted(seen) == list(range(flat.numel()))

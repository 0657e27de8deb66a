"""MXFP4 MoE kernels (router, decode GEMVs, prefill grouped GEMMs) against ``ops.route``/``ops.moe``.

Under TRITON_INTERPRET=1 without a GPU. Sizes are multiples of 32 (an MXFP4 block) but not of the
kernels' 64-wide tiles; token counts cover the GEMV path (<= 8) and the grouped GEMM (> 8), with
experts that get no token, one token, and more than one tile of tokens.
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
@pytest.mark.parametrize("N", [1, 3, 8, 9, 150])       # GEMV: 1, 3, 8; grouped GEMM: 9, 150
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

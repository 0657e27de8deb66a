"""The batched decode MoE (``gptoss_kernels.moe_batch``: 5-32 bf16 tokens, each expert in use read
once for all its tokens) against the exact result and ``ops.moe``, under the interpreter.

Tokens per expert from 1 to all of them (8 experts: most take many; 32: a few each), row blocks
and K parts with tails (D = 96, F = 160), top-4 and top-2, and repeated calls (the counters).
"""

from __future__ import annotations

import pytest
import torch
from gptoss_kernels import arrive, moe, moe_batch
from kernels_util import HAS_CUDA, moe_weights, poison_allocations, rel_err  # noqa: F401
from test_kernels_moe_decode import _rounded_reference, assert_one_rounding

DEV = "cuda" if HAS_CUDA else "cpu"


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("N", [5, 8, 17, 32])
@pytest.mark.parametrize("E,D,F,top_k", [(8, 96, 160, 4), (32, 64, 64, 4), (4, 64, 32, 2)])
def test_moe_batch_bf16(N, E, D, F, top_k):
    w = moe_weights(E, D, F, torch.bfloat16, DEV, seed=N + E)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(N)).to(DEV, torch.bfloat16)
    weights, experts = moe.route_torch(x, w["router_w"], w["router_b"], top_k)
    args = (x, w["router_w"], w["router_b"], w["w1_blocks"], w["w1_scales"], w["w1_bias"],
            w["w2_blocks"], w["w2_scales"], w["w2_bias"], top_k, 7.0)
    assert moe.uses_batch_gemv(x, w["w1_scales"], w["w2_scales"])
    tri_y = moe.moe(*args, routing=(weights, experts))
    assert tri_y.dtype == torch.bfloat16
    assert_one_rounding(tri_y, _rounded_reference(x, w, weights, experts, 7.0))
    assert rel_err(tri_y, moe.moe_torch(*args)) < 1e-2
    assert torch.equal(moe.moe(*args, routing=(weights, experts)), tri_y)        # a replay: same bits
    assert not arrive.counters(x.device, 1).any()


def test_moe_batch_reads_each_expert_once():
    """The tile table: every expert in use has exactly one tile, holding all its tokens."""
    experts = torch.tensor([[0, 3, 1, 2], [3, 0, 2, 5], [1, 3, 0, 6], [3, 7, 0, 1], [2, 3, 4, 0]])
    order, tile_expert, row0, row_end = moe._tiles(experts, 8, 16)
    used = tile_expert[tile_expert >= 0]
    assert sorted(used.tolist()) == sorted(set(experts.flatten().tolist()))
    counts = (row_end - row0)[tile_expert >= 0]
    assert counts.tolist() == [int((experts == e).sum()) for e in used.tolist()]
    assert (tile_expert[:min(8, experts.numel())] >= 0).sum() == used.numel()    # used tiles come first


def test_moe_batch_bounds():
    """bf16 and DECODE_MAX_TOKENS < N <= BATCH_MAX_TOKENS only: fp32, fp16 and prefill batches
    take the grouped GEMMs; 1-4 tokens the GEMVs."""
    w = moe_weights(4, 64, 32, torch.bfloat16, "cpu", seed=1)
    s1, s2 = w["w1_scales"], w["w2_scales"]
    for N, dtype, ok in ((4, torch.bfloat16, False), (5, torch.bfloat16, True), (32, torch.bfloat16, True),
                         (33, torch.bfloat16, False), (8, torch.float32, False), (8, torch.float16, False)):
        assert moe.uses_batch_gemv(torch.zeros(N, 64, dtype=dtype), s1, s2) == ok, (N, dtype)
    assert moe_batch.BATCH_MAX_TOKENS == 32

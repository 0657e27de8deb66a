"""The MoE's decode GEMVs (``gptoss_kernels.moe_decode``) against ``ops.moe``, under the interpreter.

bf16, the dtype a GPU decodes in, takes the tensor-core path: its dequantised weights are exact and
its products and sums are float32, so its result is the exact one rounded once; under the
interpreter the same dequantised values are multiplied in float32 (its bf16 ``tl.dot`` is
garbage), so bf16 is checked here to one rounding as on a GPU. fp32 and fp16 take the CUDA-core
path (``test_kernels_moe.py`` covers them at small shapes). gpt-oss's own shapes (D = F = 2880,
20b's 32 and 120b's 128 experts) run once per dtype: about half a minute each on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
from gptoss_kernels import arrive, moe, moe_decode
from kernels_util import HAS_CUDA, moe_weights, poison_allocations, rel_err  # noqa: F401

from gptoss_cli import ops

DEV = "cuda" if HAS_CUDA else "cpu"


def _rounded_reference(x, w, weights, experts, limit):
    """``ops.moe`` in float32 from x's values, rounding the SwiGLU output to x's dtype where the
    decode GEMVs store it: their result is this one rounded once (products and sums in fp32)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for n, row in enumerate(experts.tolist()):
        for slot, e in enumerate(row):
            w1 = ops.dequant_mxfp4(w["w1_blocks"][e], w["w1_scales"][e], torch.float32)
            a = ops.swiglu(w1 @ x[n].float() + w["w1_bias"][e].float(), limit).to(x.dtype).float()
            w2 = ops.dequant_mxfp4(w["w2_blocks"][e], w["w2_scales"][e], torch.float32)
            out[n] += weights[n, slot] * (w2 @ a + w["w2_bias"][e].float())
    return out


def assert_one_rounding(tri: torch.Tensor, ref: torch.Tensor):
    """tri (16-bit) within one unit in the last place of the float32 ``ref``, elementwise, plus an
    absolute 1e-3 of the largest: where h sits on a rounding boundary of the SwiGLU output, float32
    sums in another order round it the other way, which moves small outputs by a few ulp."""
    bits = 8 if tri.dtype == torch.bfloat16 else 11
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - (bits - 1))
    err = (tri.float() - ref).abs()
    assert (err <= ulp + 1e-3 * ref.abs().max()).all(), f"{(err / ulp).max():.2f} ulp"


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("N", [1, 3, 4])
@pytest.mark.parametrize("E,D,F,top_k", [(8, 96, 160, 4), (4, 64, 32, 2)])
def test_moe_gemv_bf16(N, E, D, F, top_k):
    """The bf16 decode GEMVs (tensor cores on a GPU; under the interpreter the same dequantised
    values, multiplied in fp32): one rounding from the exact result, and close to ``ops.moe``."""
    w = moe_weights(E, D, F, torch.bfloat16, DEV, seed=N + E)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(N)).to(DEV, torch.bfloat16)
    weights, experts = moe.route_torch(x, w["router_w"], w["router_b"], top_k)
    args = (x, w["router_w"], w["router_b"], w["w1_blocks"], w["w1_scales"], w["w1_bias"],
            w["w2_blocks"], w["w2_scales"], w["w2_bias"], top_k, 7.0)
    tri_y = moe.moe(*args, routing=(weights, experts))
    assert tri_y.dtype == torch.bfloat16
    assert_one_rounding(tri_y, _rounded_reference(x, w, weights, experts, 7.0))
    assert rel_err(tri_y, moe.moe_torch(*args)) < 1e-2


def _lazy_experts(E, D, F, used, dtype, seed):
    """Weights of E experts in gpt-oss's shapes where only ``used`` ones hold data (random codes,
    real scales): the codes of the rest are never written (the pages never touched), so 128 experts
    cost little more memory than 4; their scales are zeros, as ``scales_fit`` reads them all."""
    g = torch.Generator().manual_seed(seed)
    w = {"w1_blocks": torch.empty(E, 2 * F, D // 32, 16, dtype=torch.uint8),
         "w1_scales": torch.zeros(E, 2 * F, D // 32, dtype=torch.uint8),
         "w1_bias": torch.empty(E, 2 * F, dtype=dtype),
         "w2_blocks": torch.empty(E, D, F // 32, 16, dtype=torch.uint8),
         "w2_scales": torch.zeros(E, D, F // 32, dtype=torch.uint8),
         "w2_bias": torch.empty(E, D, dtype=dtype)}
    for e in used:
        for name in ("w1", "w2"):
            blocks, scales, bias = (w[f"{name}_{kind}"] for kind in ("blocks", "scales", "bias"))
            blocks[e] = torch.randint(0, 256, blocks.shape[1:], generator=g, dtype=torch.uint8)
            scales[e] = torch.randint(118, 123, scales.shape[1:], generator=g, dtype=torch.uint8)
            bias[e] = torch.randn(bias.shape[1:], generator=g).to(dtype)
    return {k: v.to(DEV) for k, v in w.items()}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("E", [32, 128], ids=["20b", "120b"])
def test_moe_gemv_real_shapes(E, dtype):
    """gpt-oss's own shapes (D = F = 2880: 45 row blocks of 128 with W2's last half full, 90
    groups split in K parts with a 2-group tail) with the experts at both ends of 20b's 32 and
    120b's 128 (offsets past 2^31 bytes of codes for 120b's last): fp32 within 1e-5 of
    ``ops.moe``, bf16 one rounding from the exact result."""
    D = F = 2880
    used = [E - 1, 1, E // 2, 0]
    w = _lazy_experts(E, D, F, used, dtype, seed=E)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(E)).to(DEV, dtype)
    weights = torch.tensor([[0.4, 0.3, 0.2, 0.1]], device=DEV)
    experts = torch.tensor([used], device=DEV)
    tri_y = moe.moe(x, None, None, w["w1_blocks"], w["w1_scales"], w["w1_bias"], w["w2_blocks"],
                    w["w2_scales"], w["w2_bias"], 4, 7.0, routing=(weights, experts))
    if dtype == torch.float32:
        ref_y = moe.moe_torch(x, None, None, w["w1_blocks"], w["w1_scales"], w["w1_bias"], w["w2_blocks"],
                              w["w2_scales"], w["w2_bias"], 4, 7.0, routing=(weights, experts))
        assert rel_err(tri_y, ref_y) < 1e-5
    else:
        assert_one_rounding(tri_y, _rounded_reference(x, w, weights, experts, 7.0))


def test_moe_big_scales_take_the_grouped_gemms():
    """The bf16 GEMVs apply a scale as 2^(s-1) in bf16, exact up to s = 128: weights with a larger
    scale (never seen in a checkpoint) go to the grouped GEMMs, exact for any scale. fp32 and fp16
    take the CUDA-core GEMVs whatever the scales."""
    w = moe_weights(4, 64, 32, torch.bfloat16, "cpu", seed=1)
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert moe.uses_gemv(x, w["w1_scales"], w["w2_scales"])
    big = w["w2_scales"].clone()
    big[2, 5, 0] = moe_decode.MAX_DOT_SCALE + 1
    assert not moe_decode.scales_fit(big) and moe_decode.scales_fit(w["w2_scales"])
    assert not moe.uses_gemv(x, w["w1_scales"], big)
    assert moe.uses_gemv(x.float(), w["w1_scales"], big)
    assert not moe.uses_gemv(torch.randn(moe.DECODE_MAX_TOKENS + 1, 64), w["w1_scales"], w["w2_scales"])


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_moe_gemv_repeats_bit_for_bit(dtype):
    """The last program of each row block (of each K part, for bf16) adds the parts and resets its
    counter: a second call (a graph replay) gives the same bits, and every counter is back at 0."""
    w = moe_weights(8, 96, 160, dtype, DEV, seed=5)
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(5)).to(DEV, dtype)
    args = (x, w["router_w"], w["router_b"], w["w1_blocks"], w["w1_scales"], w["w1_bias"],
            w["w2_blocks"], w["w2_scales"], w["w2_bias"], 4, 7.0)
    first = moe.moe(*args)
    assert torch.equal(moe.moe(*args), first)
    assert not arrive.counters(x.device, 1).any()

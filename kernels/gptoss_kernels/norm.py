"""RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), alone and fused with the residual add.

gpt-oss is pre-norm: every block does ``x = x + delta`` and then normalises the new ``x`` for the
next sublayer. ``add_rmsnorm`` does both in one pass over the row, so the residual stream is read
once and written once instead of read twice. The sum is rounded to the activation dtype before it
is normalised, exactly as the unfused ``x + delta`` then ``rmsnorm`` does; the statistics are in
float32 (DESIGN.md 3).

One program normalises one row of ``d_model`` values held entirely in registers (2880 -> a
block of 4096), which is what a memory-bound row op wants at both decode and prefill sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_cli import ops


@triton.jit
def _rmsnorm_kernel(
    X, Delta, Scale, Sum, Y,            # X, Delta, Sum, Y: [n_rows, D]; Scale: [D] float32
    D, eps,
    HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(Delta + row * D + cols, mask=mask, other=0.0)
        # round the sum to the activation dtype first: the unfused path stores x + delta
        x = (x.to(tl.float32) + d.to(tl.float32)).to(Sum.dtype.element_ty)
        tl.store(Sum + row * D + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    w = tl.load(Scale + cols, mask=mask, other=0.0)
    tl.store(Y + row * D + cols, (xf * rstd * w).to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, delta: torch.Tensor | None, scale: torch.Tensor, eps: float):
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()                                       # [n_rows, D]
    y = torch.empty_like(x2)
    s = torch.empty_like(x2) if delta is not None else y
    d2 = delta.reshape(-1, D).contiguous() if delta is not None else x2
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, d2, scale.contiguous(), s, y, D, eps,
            HAS_DELTA=delta is not None, BLOCK_D=triton.next_power_of_2(D),
        )
    return s.view(x.shape), y.view(x.shape)


def rmsnorm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dimension; ``scale`` float32 [D]; returns x's dtype."""
    return _launch(x, None, scale, eps)[1]


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, eps: float):
    """``(x + delta, rmsnorm(x + delta))`` in one pass; both in x's dtype."""
    return _launch(x, delta, scale, eps)


rmsnorm_torch = ops.rmsnorm.reference
add_rmsnorm_torch = ops.add_rmsnorm.reference

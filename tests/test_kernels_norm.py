"""RMSNorm kernels against their references (under TRITON_INTERPRET=1 without a GPU)."""

from __future__ import annotations

import pytest
import torch
from gptoss_kernels import norm
from kernels_util import devices_and_dtypes, poison_allocations, rel_err  # noqa: F401

pytestmark = pytest.mark.usefixtures("poison_allocations")


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("n_rows,d_model", [(1, 64), (7, 200), (33, 2880)])   # 200: not a power of 2
def test_rmsnorm(device, dtype, n_rows, d_model):
    g = torch.Generator().manual_seed(n_rows * 1000 + d_model)
    x = (torch.randn(n_rows, d_model, generator=g) * 3).to(device, dtype)
    scale = (torch.rand(d_model, generator=g) + 0.5).to(device)
    ref_y = norm.rmsnorm_torch(x, scale, 1e-5)
    tri_y = norm.rmsnorm(x, scale, 1e-5)
    assert tri_y.dtype == dtype and tri_y.shape == x.shape
    assert rel_err(tri_y, ref_y) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 5, 200), (1, 17, 2880)])
def test_add_rmsnorm(device, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(device, dtype)
    delta = torch.randn(shape, generator=g).to(device, dtype)
    scale = (torch.rand(shape[-1], generator=g) + 0.5).to(device)
    ref_sum, ref_y = norm.add_rmsnorm_torch(x, delta, scale, 1e-5)
    tri_sum, tri_y = norm.add_rmsnorm(x, delta, scale, 1e-5)
    assert torch.equal(tri_sum, ref_sum)        # one rounding of the same fp32 sum: exact
    assert rel_err(tri_y, ref_y) < (1e-5 if dtype == torch.float32 else 1e-2)

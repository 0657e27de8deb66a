"""The MoE decode GEMVs' instruction budget, read off the compiled SASS without a GPU.

Decode at batch 1 streams the 4 chosen experts' MXFP4 weights, and copy bandwidth leaves ~5.3
SASS instructions per weight value on an H100 and ~3.7 on an H200 (DESIGN.md 5): a GEMV whose
loop spends more is bound by instruction issue, not memory. The decode GEMVs are designed to
``BUDGET`` (``gptoss_kernels.moe_decode``). This script compiles them for sm_90a at gpt-oss's
shapes (D = F = 2880, top-4) against ``kernels_compile_check``'s stand-in driver, with the
Triton it runs under, and prints one JSON line per kernel specialisation: the steady-state
loop's instructions per weight value per thread, its loads by width, barriers per iteration,
registers and spills (``ptxas -v``), programs per launch. bf16 (what a GPU decodes in) is held to
the budget, and so are the batched decode step's GEMVs (``moe_batch``, 8 and 32 tokens: 16 and 32
token columns per weight tile); fp32 and fp16 (the CUDA-core path) are reported. Exit status 1 when a bf16 GEMV is
over budget or spills.

Run: ``python tests/kernels_budget.py`` (``test_kernels_compile.py`` does, with the installed
Triton); for another Triton, run it with that Triton's Python and ``PYTHONPATH=kernels:.``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from kernels_compile_check import (COMPILED, CompileOnlyDriver, _compile_only, _ptxas, _sass_loop,  # noqa: E402
                                   gemv_values_per_iteration)
from triton.runtime.jit import JITFunction  # noqa: E402

BUDGET = 4.0                 # SASS instructions per weight value, bf16 (DESIGN.md 5)
D = F = 2880                 # gpt-oss-20b and -120b alike
TOP_K = 4
BATCH_TOKENS = (8, 32)       # the batched decode MoE (moe_batch): 16 and 32 token columns


def compile_gemvs(dtype: torch.dtype, n_experts: int = 32) -> None:
    """Launch both decode GEMVs once for one token in ``dtype`` (nothing runs: they compile)."""
    from gptoss_kernels import moe_decode

    g = torch.Generator().manual_seed(0)
    E = n_experts
    codes = lambda *s: torch.randint(0, 256, s, generator=g, dtype=torch.uint8)    # noqa: E731
    scales = lambda *s: torch.randint(100, 129, s, generator=g, dtype=torch.uint8)  # noqa: E731
    x = torch.randn(1, D, generator=g).to(dtype)
    weights = torch.full((1, TOP_K), 0.25)
    experts = torch.arange(TOP_K).view(1, TOP_K)
    moe_decode.gemv_moe(x, weights, experts, codes(E, 2 * F, D // 32, 16), scales(E, 2 * F, D // 32),
                        torch.zeros(E, 2 * F, dtype=dtype), codes(E, D, F // 32, 16), scales(E, D, F // 32),
                        torch.zeros(E, D, dtype=dtype), TOP_K, 7.0, torch.empty(1, D, dtype=dtype))
    if dtype != torch.bfloat16:
        return
    from gptoss_kernels import moe_batch

    for N in BATCH_TOKENS:       # a batched decode step: 16 token columns, then 32
        x = torch.randn(N, D, generator=g).to(dtype)
        experts = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(N)])
        moe_batch.batch_moe(x, torch.full((N, TOP_K), 0.25), experts, codes(E, 2 * F, D // 32, 16),
                            scales(E, 2 * F, D // 32), torch.zeros(E, 2 * F, dtype=dtype), codes(E, D, F // 32, 16),
                            scales(E, D, F // 32), torch.zeros(E, D, dtype=dtype), TOP_K, 7.0,
                            torch.empty(N, D, dtype=dtype))


def _programs(name: str, consts: dict, n_experts: int = 32) -> int:
    rows = 2 * F if name in ("_moe_gemv1", "_moe_bgemv1") else D
    block, splits = consts["BLOCK_R"], consts["SPLITS"]
    if name.startswith("_moe_bgemv"):      # a grid row per expert that may be in use
        return triton.cdiv(rows, block) * min(n_experts, consts["BLOCK_T"] * TOP_K) * splits
    return triton.cdiv(rows, block) * TOP_K * splits


def main(argv: list[str]) -> int:
    triton.runtime.driver.set_active(CompileOnlyDriver(90))
    JITFunction.run = _compile_only(JITFunction.run)
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        compile_gemvs(dtype)
    bad = 0
    for kern in COMPILED:
        names = list(kern.src.signature)
        consts = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in kern.src.constants.items()}
        consts = {k: v for k, v in consts.items() if isinstance(k, str) and k.isupper()}
        consts.setdefault("DOT", True)                    # the batched GEMVs: bf16 only
        dtype = str(consts.get("X_DTYPE", "bf16")).removeprefix("triton.language.")
        row = {"kernel": kern.name, "triton": triton.__version__, "arch": "sm_90a", "dtype": dtype,
               "path": "tensor-core" if consts["DOT"] else "cuda-core", "block_rows": consts["BLOCK_R"],
               "k_splits": consts["SPLITS"], "programs": _programs(kern.name, consts),
               "token_columns": consts.get("BLOCK_T", 16),
               "num_warps": kern.metadata.num_warps, "num_stages": kern.metadata.num_stages,
               "shared_bytes": kern.metadata.shared}
        row |= _ptxas(kern, 90)
        row |= _sass_loop(kern, gemv_values_per_iteration(consts))
        if consts["DOT"]:
            over = (row.get("sass_per_weight_value") or float("inf")) > BUDGET or row["spill_stores"]
            row["budget"] = BUDGET
            row["ok"] = not over
            bad += bool(over)
        print(json.dumps(row))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

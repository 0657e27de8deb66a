"""Compile every Triton kernel for a real GPU target, without a GPU.

The interpreter runs the kernels' semantics on the CPU but not Triton's compiler, which rejects
things the interpreter accepts (Python globals, mistyped branches, unsupported ops) and decides
shared memory and register use. This script swaps in a driver that reports a GPU target and
launches nothing, then calls each public kernel function on CPU tensors in the shapes and dtypes
the runtime uses (the gpt-oss-20b layer; decode and prefill): every launch compiles down to a
cubin with Triton's bundled ptxas and stops there. Outputs are garbage and ignored.

Run: ``python tests/kernels_compile_check.py [sm_90|sm_80] [--ptxas]`` (one JSON line per
kernel specialisation: shared memory, and with ``--ptxas`` registers and spills from ``ptxas -v``
and, for the MoE decode GEMVs, their weight loop from the SASS: instructions, loads by width
(``LDG.E.128`` is 16 bytes), barriers and instructions per weight value per thread).
``kernels_budget.py`` holds the decode GEMVs to their instruction budget with the same tools.
Needs TRITON_INTERPRET unset or 0; ``test_kernels_compile.py`` runs it in a subprocess.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ARCH = {"sm_90": 90, "sm_80": 80}
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}     # max dynamic shared memory per block


class CompileOnlyDriver(CudaDriver):
    """A CUDA driver that knows a target and nothing else (no libcuda needed)."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED: list = []


def _compile_only(run):
    def patched(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED.append(kernel)
        return kernel
    return patched


def _ptxas(kernel, arch: int) -> dict:
    # the ptxas Triton itself compiles with for this arch (3.9: the newer "-blackwell" one)
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                         capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores", out.stderr)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None}


def _sass_loop(kernel, values_per_iteration: int) -> dict:
    """The loop that streams the weights, from the cubin's SASS (nvdisasm): its instructions, its
    weight loads by width (``LDG.E.128``: 16 bytes into registers; ``LDGSTS``: copies into shared
    memory, what a software-pipelined loop issues), barriers, and instructions per weight value
    per thread."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    lines, labels, loops = [], {}, []
    for line in out.stdout.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(lines)
            continue
        ins = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if ins:
            lines.append(ins.group(1))
            back = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", ins.group(1))
            if back and back.group(1) in labels:        # a backward branch closes a loop
                loops.append(lines[labels[back.group(1)]:])
    loops = [body for body in loops if any(re.search(r"\bLDG", i) for i in body)]
    if not loops:
        return {"sass_loop": None}
    body = max(loops, key=len)                          # the weight loop (the others are epilogues)
    loads = [m.group(0) for m in (re.search(r"\bLDG(?!DEPBAR)\S*", i) for i in body) if m]
    threads = kernel.metadata.num_warps * 32
    opcodes = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split()[0] for i in body)
    return {"sass_loop_instructions": len(body),
            "sass_loop_top_ops": dict(opcodes.most_common(8)),
            "sass_loop_loads": {w: loads.count(w) for w in sorted(set(loads))},
            "sass_loop_barriers": sum(1 for i in body if re.search(r"\bBAR\.", i)),
            "sass_per_weight_value": round(len(body) / (values_per_iteration / threads), 2)}


def gemv_values_per_iteration(consts: dict) -> int:
    """Weight values one iteration of a decode GEMV's loop reads (``moe_decode``'s tiles)."""
    from gptoss_kernels import moe_decode

    rows = consts["BLOCK_R"]
    groups = moe_decode.DOT_GROUPS if consts["DOT"] else (16 if rows <= 32 else 8)
    return rows * groups * 32


GEMVS = ("_moe_gemv1", "_moe_gemv2")


def exercise(dtype: torch.dtype, n_experts: int = 32) -> None:
    """Call every kernel the way the 20b model does, in ``dtype``."""
    from gptoss_kernels import attention, moe, norm, rope

    from gptoss_cli import ops

    D, F, E, H, K, dh, W, ctx = 2880, 2880, n_experts, 64, 8, 64, 128, 4096
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    for T in (1, 300):                                  # decode, prefill
        x = rnd(T, D)
        norm.rmsnorm(x, rnd(D, dt=torch.float32), 1e-5)
        norm.add_rmsnorm(x, rnd(T, D), rnd(D, dt=torch.float32), 1e-5)
        qkv = rnd(1, T, (H + 2 * K) * dh)
        q, k, v = qkv.split((H * dh, K * dh, K * dh), dim=-1)
        q, k, v = q.view(1, T, H, dh), k.view(1, T, K, dh), v.view(1, T, K, dh)
        cos, sin = ops.rope_table(ctx, dh, 150000.0, 32.0, 4096, 1.0, 32.0, 1.35)
        cache = rnd(1, ctx, K, dh)
        pos = torch.arange(T) + 7
        rope.rope_store(q, k, v, cos, sin, pos, cache, cache.clone(), pos, None, rnd((H + 2 * K) * dh))
        if T == 1:                                      # decode into a ring: the slot found in-kernel
            rope.rope_store(q, k, v, cos, sin, pos, cache[:, :W], cache[:, :W].clone(), None, torch.arange(W),
                            rnd((H + 2 * K) * dh))          # with the qkv bias, as the model calls it
            attention.attention(q, cache, cache, rnd(H, dt=torch.float32), pos, torch.arange(ctx), 0,
                                dh ** -0.5, True)       # the graph step over a full cache
            moe.add_rmsnorm_route(x, rnd(T, D), rnd(D, dt=torch.float32), 1e-5, rnd(E, D), rnd(E), 4, rnd(D))
        sinks = rnd(H, dt=torch.float32)
        for S, window in ((ctx, 0), (W + T, W), (W, W)):
            attention.attention(q, cache[:, :S], cache[:, :S], sinks, pos, torch.arange(S), window, dh ** -0.5)
        for N in (4, 32) if T == 1 else ():             # the batched decode step: N sequences in a pool
            B = N + 1
            qkv = rnd(N, (H + 2 * K) * dh)
            qn, kn, vn = qkv.split((H * dh, K * dh, K * dh), dim=-1)
            qn, kn, vn = qn.view(N, H, dh), kn.view(N, K, dh), vn.view(N, K, dh)
            rows, at = torch.randperm(N) + 1, torch.randint(0, 2048, (N,))
            pool, ring = rnd(B, 2048, K, dh), rnd(B, W, K, dh)
            ring_pos = torch.full((B, W), -1)
            rope.rope_store_rows(qn, kn, vn, cos, sin, rows, at, pool, pool.clone(), None, rnd((H + 2 * K) * dh))
            rope.rope_store_rows(qn, kn, vn, cos, sin, rows, at, ring, ring.clone(), ring_pos, rnd((H + 2 * K) * dh))
            attention.attention_rows(qn, pool, pool, sinks, rows, at, None, 0, dh ** -0.5)
            attention.attention_rows(qn, ring, ring, sinks, rows, at, ring_pos, W, dh ** -0.5)
        route = moe.route

        def route_then_valid(x, *args):   # nothing ran: give the expert kernels valid indices
            route(x, *args)
            return torch.rand(x.shape[0], 4).softmax(-1), torch.randperm(E)[:4].repeat(x.shape[0], 1)

        moe.route = route_then_valid
        blocks = lambda *s: torch.randint(0, 256, s, generator=g, dtype=torch.uint8)  # noqa: E731
        scales = lambda *s: torch.randint(100, 129, s, generator=g, dtype=torch.uint8)  # noqa: E731  (real ones)
        moe.moe(x, rnd(E, D), rnd(E), blocks(E, 2 * F, D // 32, 16), scales(E, 2 * F, D // 32),
                rnd(E, 2 * F), blocks(E, D, F // 32, 16), scales(E, D, F // 32), rnd(E, D), 4, 7.0)
        moe.route = route


def main(argv: list[str]) -> int:
    arch = ARCH[next((a for a in argv if a.startswith("sm_")), "sm_90")]
    triton.runtime.driver.set_active(CompileOnlyDriver(arch))
    JITFunction.run = _compile_only(JITFunction.run)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        exercise(dtype)
    exercise(torch.bfloat16, n_experts=128)              # gpt-oss-120b: 128 experts
    seen, bad = set(), 0
    for kern in COMPILED:
        if kern.hash in seen:
            continue
        seen.add(kern.hash)
        names = list(kern.src.signature)
        consts = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in kern.src.constants.items()}
        row = {"kernel": kern.name, "arch": f"sm_{arch}",
               "dtype": next(t for t in kern.src.signature.values() if t.startswith("*")).lstrip("*"),
               "constexprs": {k: v if isinstance(v, (int, float, bool, str)) else str(v)
                              for k, v in consts.items() if isinstance(k, str) and k.isupper()},
               "shared_bytes": kern.metadata.shared, "num_warps": kern.metadata.num_warps}
        if "--ptxas" in argv:
            row |= _ptxas(kern, arch)
            if kern.name in GEMVS:
                row |= _sass_loop(kern, gemv_values_per_iteration(consts))
        if kern.metadata.shared > SMEM_LIMIT[arch]:
            row["error"] = "shared memory over the limit"
            bad += 1
        print(json.dumps(row))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

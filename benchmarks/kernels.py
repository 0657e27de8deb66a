"""Each Triton kernel against its PyTorch reference, at the shapes of one gpt-oss-20b layer.

Decode shapes (1 token) are memory-bound: reported as GB/s of the bytes they must read (weights,
cache) against the device's copy bandwidth measured in the same run. Prefill shapes (2048 tokens)
are reported as TFLOP/s. Timings are ``triton.testing.do_bench`` medians (ms). One JSON object a
line, the summary table first.

Run on a GPU:  python benchmarks/kernels.py [--dtype bfloat16] [--only moe,attention]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from gptoss_cli import ops
from gptoss_cli.config import PRESETS


def cases(dtype: torch.dtype, dev: str):
    """(name, op, args, bytes moved, flops) for each op and shape."""
    from gptoss_kernels import attention, moe, norm, rope

    cfg = PRESETS["gpt-oss-20b"]
    D, F, E = cfg.d_model, cfg.d_ff, cfg.n_experts
    H, K, dh, W = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.sliding_window
    g = torch.Generator(device=dev).manual_seed(0)
    esz = torch.tensor([], dtype=dtype).element_size()

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=dev).to(dt)

    def u8(*shape):
        return torch.randint(0, 256, shape, generator=g, device=dev, dtype=torch.uint8)

    def scales(*shape):        # E8M0 near 2^-8: activations of order one
        return torch.randint(118, 122, shape, generator=g, device=dev, dtype=torch.uint8)

    w = (rnd(E, D), rnd(E), u8(E, 2 * F, D // 32, 16), scales(E, 2 * F, D // 32), rnd(E, 2 * F),
         u8(E, D, F // 32, 16), scales(E, D, F // 32), rnd(E, D))
    expert_bytes = (2 * F * D + D * F) * 17 / 32               # codes + scales, one expert
    cos, sin = ops.rope_table(8192, dh, cfg.rope_theta, 32.0, 4096, 1.0, 32.0, cfg.yarn_concentration,
                              device=dev)
    sinks = rnd(H, dt=torch.float32)
    for T in (1, 2048):
        x = rnd(T, D)
        yield (f"add_rmsnorm T={T}", norm.add_rmsnorm, ops.add_rmsnorm.reference,
               (x, rnd(T, D), rnd(D, dt=torch.float32), 1e-5), 4 * T * D * esz, 0)
        qkv = rnd(1, T, (H + 2 * K) * dh)
        q, k, v = qkv.split((H * dh, K * dh, K * dh), dim=-1)
        q, k, v = q.view(1, T, H, dh), k.view(1, T, K, dh), v.view(1, T, K, dh)
        cache_k, cache_v = rnd(1, 8192, K, dh), rnd(1, 8192, K, dh)
        pos = torch.arange(T, device=dev) + 2048
        yield (f"rope_store T={T}", rope.rope_store, ops.rope_store.reference,
               (q, k, v, cos, sin, pos, cache_k, cache_v, pos), 2 * T * (H + 2 * K) * dh * esz, 0)
        if T == 1:
            yield ("add_rmsnorm_route T=1", moe.add_rmsnorm_route, ops.add_rmsnorm_route.reference,
                   (x, rnd(T, D), rnd(D, dt=torch.float32), 1e-5, w[0], w[1], 4), (4 * D + E * D) * esz, 2 * E * D)
        N = min(T, 2048)
        yield (f"moe N={N}", moe.moe, ops.moe.reference, (x,) + w + (4, 7.0),
               (min(E, 4 * N) * expert_bytes), 2 * N * 4 * 3 * F * D)
    ctx = 2048
    for T, S, window, name in ((1, ctx, 0, "decode full ctx=2048"),
                               (1, 8192, 0, "decode graph buffer=8192 at 2048"),
                               (1, W, W, "decode ring W=128"),
                               (2048, 2048, 0, "prefill causal 2048"),
                               (2048, 2048, W, "prefill window 2048")):
        q = rnd(1, T, H, dh)
        kk, vv = rnd(1, S, K, dh), rnd(1, S, K, dh)
        q_pos = torch.arange(ctx - T, ctx, device=dev)
        k_pos = torch.arange(S, device=dev)
        seen = min(S, ctx) if not window else min(window, S)
        yield (f"attention {name}", attention.attention, ops.attention.reference,
               (q, kk, vv, sinks, q_pos, k_pos, window, dh ** -0.5, not window),   # full: keys by position
               2 * seen * K * dh * esz, 4 * T * H * dh * (seen if T == 1 else (seen / 2 if not window else window)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--only", default="", help="comma-separated name filters")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from decode_20b import measure_bandwidth
    from triton.testing import do_bench

    dtype = getattr(torch, args.dtype)
    bw = measure_bandwidth(torch.device("cuda"))
    rows = []
    for name, tri, ref, a, nbytes, flops in cases(dtype, "cuda"):
        if args.only and not any(f in name for f in args.only.split(",")):
            continue
        tri_ms = do_bench(lambda: tri(*a))
        ref_ms = do_bench(lambda: ref(*a))
        gbps = nbytes / tri_ms / 1e6
        rows.append({"op": name, "dtype": args.dtype, "triton_ms": tri_ms, "reference_ms": ref_ms,
                     "triton_GBps": gbps, "bandwidth_share": gbps / (bw / 1e9),
                     "triton_TFLOPs": flops / tri_ms / 1e9 if flops else None})
    print(f"{'op':42s} {'triton ms':>10s} {'ref ms':>10s} {'GB/s':>8s} {'bw %':>6s} {'TFLOP/s':>8s}"
          f"   (copy bandwidth {bw / 1e9:.0f} GB/s)")
    for r in rows:
        ref = f"{r['reference_ms']:.3f}" if r["reference_ms"] is not None else "-"
        tf = f"{r['triton_TFLOPs']:.1f}" if r["triton_TFLOPs"] else "-"
        print(f"{r['op']:42s} {r['triton_ms']:10.3f} {ref:>10s} {r['triton_GBps']:8.0f} "
              f"{100 * r['bandwidth_share']:6.1f} {tf:>8s}")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

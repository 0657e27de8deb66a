"""The native CPU ops of a batched decode step (continuous batching) against PyTorch, at
gpt-oss-20b widths: ``attention_rows`` and ``rope_store_rows`` (N sequences in a pooled cache),
and ``linear`` / the norms at 1-64 rows (is the native version still faster past its
16-row limit?). Best of several runs of each (a shared machine: the minimum is the least
disturbed). One line per case, then JSON as the last line.

Run on any machine:  GPTOSS_THREADS=2 python benchmarks/cpu_batch_rows.py [--rows 1 8 32] [--limits]
"""

from __future__ import annotations

import gptoss_cli  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)
import argparse
import json
import time

import torch
import torch.nn.functional as F

from gptoss_cli import cpu_ops, ops

H, K, DH, D = 64, 8, 64, 2880        # gpt-oss-20b: query heads, kv heads, head dim, d_model


def best_us(fn, *args, reps: int = 3, trials: int = 5) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(*args)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e6


def attention_cases(rows: list[int], results: list) -> None:
    for dtype in (torch.bfloat16, torch.float32):
        for layout, S, window in (("full", 2048, 0), ("ring", 128, 128)):
            for N in rows:
                g = torch.Generator().manual_seed(N)
                q = torch.randn(N, H, DH, generator=g).to(dtype)
                kc, vc = (torch.randn(N + 1, S, K, DH, generator=g).to(dtype) for _ in range(2))
                seq_rows = torch.randperm(N, generator=g) + 1                 # row 0: the scratch row
                pos = torch.full((N,), S - 1 if layout == "full" else 1000)
                k_pos = None if layout == "full" else torch.arange(S).expand(N + 1, S).contiguous() + 1000 - (S - 1)
                args = (q, kc, vc, torch.randn(H), seq_rows, pos, k_pos, window, DH ** -0.5)
                native = best_us(cpu_ops.attention_rows, *args)
                ref = best_us(ops.attention_rows.reference, *args, reps=1, trials=3)
                results.append({"op": "attention_rows", "dtype": str(dtype)[6:], "layout": layout, "live": S,
                                "rows": N, "native_us": round(native), "reference_us": round(ref)})
        for N in rows:
            qkv = torch.randn(N, (H + 2 * K) * DH).to(dtype)
            q, k, v = qkv.split((H * DH, K * DH, K * DH), -1)
            cos, sin = ops.rope_table(4096, DH, 150000.0, 32.0, 4096, 32.0, 1.0, 1.35)
            kc, vc = (torch.randn(N + 1, 2048, K, DH).to(dtype) for _ in range(2))
            args = (q.view(N, H, DH), k.view(N, K, DH), v.view(N, K, DH), cos, sin, torch.arange(N) + 1,
                    torch.full((N,), 2047), kc, vc, None, torch.randn(qkv.shape[-1]).to(dtype))
            results.append({"op": "rope_store_rows", "dtype": str(dtype)[6:], "layout": "full", "rows": N,
                            "native_us": round(best_us(cpu_ops.rope_store_rows, *args)),
                            "reference_us": round(best_us(ops.rope_store_rows.reference, *args))})


def limit_cases(rows: list[int], results: list) -> None:
    """Native versions forced on past their limits, against what runs there instead."""
    saved = cpu_ops.LINEAR_MAX_ROWS, cpu_ops.SMALL_MAX_ROWS
    cpu_ops.LINEAR_MAX_ROWS = cpu_ops.SMALL_MAX_ROWS = 1 << 20
    try:
        for dtype in (torch.bfloat16, torch.float32):
            wq, bq = (torch.randn(5120, D) / 50).to(dtype), torch.randn(5120).to(dtype)
            rw, rb, scale = (torch.randn(32, D) / 50).to(dtype), torch.randn(32).to(dtype), torch.rand(D) + 0.5
            for N in rows:
                x, d = torch.randn(N, D).to(dtype), torch.randn(N, D).to(dtype)
                cases = {"rmsnorm": (cpu_ops.rmsnorm, ops.rmsnorm.reference, (x, scale, 1e-5)),
                         "add_rmsnorm": (cpu_ops.add_rmsnorm, ops.add_rmsnorm.reference, (x, d, scale, 1e-5)),
                         "add_rmsnorm_route": (cpu_ops.add_rmsnorm_route, ops.add_rmsnorm_route.reference,
                                               (x, d, scale, 1e-5, rw, rb, 4, bq[:D]))}
                if dtype == torch.bfloat16:
                    cases["linear qkv"] = (cpu_ops.linear, F.linear, (x, wq, bq))
                for name, (native, other, args) in cases.items():
                    results.append({"op": name, "dtype": str(dtype)[6:], "rows": N,
                                    "native_us": round(best_us(native, *args)),
                                    "pytorch_us": round(best_us(other, *args))})
    finally:
        cpu_ops.LINEAR_MAX_ROWS, cpu_ops.SMALL_MAX_ROWS = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--limits", action="store_true", help="linear and the norms at 1-64 rows instead")
    args = parser.parse_args()
    torch.set_num_threads(cpu_ops.apply_thread_count())
    results: list = []
    if args.limits:
        limit_cases(args.rows if args.rows != [1, 8, 32] else [1, 8, 16, 17, 24, 32, 48, 64], results)
    else:
        attention_cases(args.rows, results)
    for r in results:
        print("  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    print(json.dumps({"cpu": cpu_ops.cpu_name(), "threads": cpu_ops.cpu_threads(), "library": cpu_ops.status(),
                      "results": results}))


if __name__ == "__main__":
    main()

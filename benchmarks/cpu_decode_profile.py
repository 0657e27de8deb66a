"""Where a CPU decode step goes: each op of ``Transformer.forward`` timed inside one step.

Why: ``gptoss bench`` gives the whole step; to know what to make faster, this wraps every
function of ``ops`` that the forward pass calls with a timer, runs decode steps on random weights
in gpt-oss-20b's real shapes (``--layers`` of its 24), and prints the mean milliseconds per step
of each op and of the whole step (the difference is Python between the ops).

    python benchmarks/cpu_decode_profile.py --layers 4 --dtype bfloat16 --steps 20

Settings: ``GPTOSS_THREADS`` as for the engine. The numbers on a shared machine swing with its
load: run it twice, and compare ops within one run.
"""

from __future__ import annotations

import gptoss_cli  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)
import argparse
import collections
import time

import torch

from gptoss_cli import cpu_ops, ops
from gptoss_cli.config import PRESETS
from gptoss_cli.engine import Engine

OPS = ("linear", "rope_store", "attention", "add_rmsnorm_route", "moe", "add_rmsnorm", "rmsnorm")


def timed(spent: dict[str, float], name: str):
    f = getattr(ops, name)

    def op(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t0

    op.reference = getattr(f, "reference", f)
    return op


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="layers of gpt-oss-20b's 24 (default 4)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prompt", type=int, default=128, help="tokens before the timed steps")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    threads = cpu_ops.apply_thread_count()
    cfg = PRESETS["gpt-oss-20b"].replace(n_layers=args.layers)
    eng = Engine.random(cfg, device="cpu", dtype=args.dtype, max_context=args.prompt + args.steps + 8)
    list(eng.generate(list(range(1000, 1000 + args.prompt)), max_new_tokens=2, temperature=0))
    model, cache, pos = eng.model, eng.cache, args.prompt + 1
    tok = torch.tensor([[5]])
    spent: dict[str, float] = collections.defaultdict(float)
    for name in OPS:
        setattr(ops, name, timed(spent, name))
    for i in range(3):                                             # warm-up steps
        model.logits(model.forward(tok, cache, pos + i)[0, -1])
    spent.clear()
    t0 = time.perf_counter()
    for i in range(args.steps):
        model.logits(model.forward(tok, cache, pos + 3 + i)[0, -1])
    step = (time.perf_counter() - t0) / args.steps
    print(f"gpt-oss-20b shapes, {args.layers} layers, {args.dtype}, {threads} threads, {cpu_ops.status()}")
    print(f"step {step * 1e3:.1f} ms ({1 / step:.2f} tok/s), context {pos + 3}..{pos + 2 + args.steps}")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:18s} {s / args.steps * 1e3:7.2f} ms")
    print(f"  {'(between ops)':18s} {(step - sum(spent.values()) / args.steps) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()

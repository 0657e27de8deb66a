"""Total decode tok/s of 1, 2, 4, 8 streams decoded together, in process and through ``gptoss serve``.

Random weights in a preset's real widths with its first ``--layers`` layers (default: gpt-oss-20b,
4 layers), so the bytes a step reads are the real model's per layer. Two ways, each stream count:

- in process: a ``BatchEngine`` of B slots, B prompts of ``--prompt`` random tokens joining at
  once, then ``--gen`` - 1 decode rounds, each timed to its end; total tok/s = B (gen - 1) /
  decode time (the bench's figure, ``gptoss bench --batch``);
- through the server: ``gptoss serve``'s application (``Server``, ``parallel`` = B) on a loopback
  port, B httpx clients in threads each streaming one completion of ``--gen`` tokens
  (``ignore_eos``); total tok/s = all completion tokens / the wall time from the first request
  sent to the last stream's end (prefill and HTTP included, as a client sees it).

Beside each: the memory model of a step (``bench.decode_bytes``): the weights every step reads
once whatever B is (attention, router, unembedding), the expected distinct experts u(B) of B
tokens and their bytes, and bytes per token. The ratio to one stream is what to judge against it.
The last line is one JSON object.

Run (quiet machine; ~4 GB of memory at 20b widths in bf16):
    python benchmarks/batch_decode.py --streams 1,2,4,8
"""

from __future__ import annotations

import gptoss_cli  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)
import argparse
import json
import threading
import time

import httpx
import torch

from gptoss_cli.batch import BatchEngine
from gptoss_cli.bench import decode_bytes
from gptoss_cli.config import preset
from gptoss_cli.engine import Engine
from gptoss_cli.sampling import SamplingParams


def in_process(eng: Engine, B: int, prompt: int, gen: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, eng.config.vocab_size, (B, prompt), generator=g).tolist()
    be = BatchEngine(eng, B, max_context=eng.max_context)
    reqs = [be.submit(p, SamplingParams(temperature=0), gen) for p in prompts]
    be._admit()
    be._prefill()
    t0 = time.perf_counter()
    rounds = 0
    while be.active:
        be.step()
        rounds += 1
    dt = time.perf_counter() - t0
    for r in reqs:
        r.tokens_out()
    be.close()
    return B * (gen - 1) / dt


def served(eng: Engine, B: int, prompt: int, gen: int) -> float:
    import uvicorn

    from gptoss_cli.serve import Server, bind

    server = Server(eng, "m", parallel=B)
    sock = bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    counts = [0] * B

    def client(i: int) -> None:
        body = {"model": "m", "prompt": [(97 * i + j) % 50000 + 1 for j in range(prompt)], "max_tokens": gen,
                "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url, json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        counts[i] = usage["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(B)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    uv.should_exit = True
    thread.join(10)
    server.worker.stop()
    assert all(c == gen for c in counts), counts
    return sum(counts) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-oss-20b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=33)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeat", type=int, default=2, help="runs per figure; the best is kept")
    ap.add_argument("--no-serve", action="store_true", help="only the in-process figures")
    args = ap.parse_args()
    cfg = preset(args.preset)
    cfg = cfg.replace(n_layers=args.layers, windowed_layers=cfg.windowed_layers[:args.layers])
    eng = Engine.random(cfg, device=args.device, dtype=args.dtype, max_context=args.prompt + args.gen + 16)
    streams = [int(s) for s in args.streams.split(",")]
    ctx = args.prompt + args.gen // 2
    rows = []
    in_process(eng, 1, args.prompt, 4, 0)                   # warm-up (library build, page faults)
    for B in streams:
        local = max(in_process(eng, B, args.prompt, args.gen, r) for r in range(args.repeat))
        http = None if args.no_serve else max(served(eng, B, args.prompt, args.gen) for _ in range(args.repeat))
        by = decode_bytes(cfg, ctx, eng.dtype, B)
        shared = by["attention"] + by["router"] + by["unembedding"] + by["norms"]
        E, k = cfg.n_experts, cfg.n_experts_per_token
        rows.append({"streams": B, "in_process_tok_s": local, "served_tok_s": http,
                     "experts_per_layer": E * (1 - (1 - k / E) ** B), "shared_gb": shared / 1e9,
                     "experts_gb": by["experts"] / 1e9, "step_gb": sum(by.values()) / 1e9,
                     "gb_per_token": sum(by.values()) / B / 1e9})
    base = rows[0]
    print(f"{args.preset} widths, {args.layers} layers, {eng.dtype}, {args.device}, prompt {args.prompt}, "
          f"gen {args.gen}, best of {args.repeat}")
    print("streams  in-process tok/s (x1)  served tok/s (x1)  experts/layer  shared GB  experts GB  GB/token")
    for r in rows:
        served_cell = (f"{r['served_tok_s']:8.1f} ({r['served_tok_s'] / base['served_tok_s']:.2f}x)"
                       if r["served_tok_s"] else "       -        ")
        print(f"{r['streams']:7d}  {r['in_process_tok_s']:10.1f} ({r['in_process_tok_s'] / base['in_process_tok_s']:.2f}x)"
              f"  {served_cell}  {r['experts_per_layer']:13.1f}  {r['shared_gb']:9.3f}  {r['experts_gb']:10.3f}"
              f"  {r['gb_per_token']:8.3f}")
    print(json.dumps({"preset": args.preset, "layers": args.layers, "dtype": str(eng.dtype), "rows": rows}))


if __name__ == "__main__":
    main()

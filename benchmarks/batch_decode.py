"""Total decode tok/s of 1, 2, 4, 8 streams decoded together, in process and through ``gptoss serve``.

Random weights in a preset's real widths with its first ``--layers`` layers (default: gpt-oss-20b,
4 layers), so the bytes a step reads are the real model's per layer. Two ways, each stream count:

- in process: a ``BatchEngine`` of B slots, B prompts of ``--prompt`` random tokens joining at
  once, then ``--gen`` - 1 decode rounds, each timed to its end; total tok/s = B (gen - 1) /
  decode time (the bench's figure, ``gptoss bench --batch``);
- through the server: ``gptoss serve``'s application (``Server``, ``parallel`` = B) on a loopback
  port, B httpx clients (threads of one other process) each streaming one completion of ``--gen`` tokens
  (``ignore_eos``). Total decode tok/s = the text events the clients receive in the window where
  every stream has its first token and none has ended, over that window (one event a token, but
  for the few a server holds back inside a UTF-8 character: the figure errs low); "e2e" = all
  completion tokens / the wall time from the first request sent to the last stream's end
  (prefill and HTTP included, as one client sees it).

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
import sys
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


def clients(url: str, B: int, prompt: int, gen: int) -> dict:
    """B streaming completions at once, a thread each (as ``hey`` runs many clients in one
    process): their token counts, the times of their text events, the wall time."""
    counts = [0] * B
    arrivals: list[list[float]] = [[] for _ in range(B)]    # when each text event came

    def client(i: int) -> None:
        body = {"model": "m", "prompt": [(97 * i + j) % 50000 + 1 for j in range(prompt)], "max_tokens": gen,
                "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url, json=body, timeout=600) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    counts[i] = event["usage"]["completion_tokens"]
                elif event.get("choices") and event["choices"][0].get("text"):
                    arrivals[i].append(time.perf_counter())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(B)]
    t0, c0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"counts": counts, "arrivals": arrivals, "wall": time.perf_counter() - t0,
            "cpu": time.process_time() - c0}


def served(eng: Engine, B: int, prompt: int, gen: int) -> tuple[float, float, float]:
    """(end-to-end, decode) total tok/s of B streams through the server, the clients in a process
    of their own (real clients do not share the server's interpreter and its lock), and the cores
    the clients kept busy meanwhile (their CPU seconds over the wall time): on a small machine
    they compete with the server for them."""
    import subprocess

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
    try:
        proc = subprocess.run([sys.executable, __file__, "--clients", url, str(B), str(prompt), str(gen)],
                              capture_output=True, text=True, timeout=1200, check=True)
    finally:
        uv.should_exit = True
        thread.join(10)
        server.worker.stop()
    got = json.loads(proc.stdout.splitlines()[-1])
    counts, arrivals = got["counts"], got["arrivals"]
    assert all(c == gen for c in counts), counts
    # decode: the events of the window where every stream is past its prefill and none has ended
    # (perf_counter is the system's monotonic clock: the two processes' readings compare)
    start, end = max(a[0] for a in arrivals), min(a[-1] for a in arrivals)
    inside = sum(start < t <= end for a in arrivals for t in a)
    return (sum(counts) / got["wall"], inside / (end - start) if end > start else float("nan"),
            got["cpu"] / got["wall"])


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
    # the repeats go round the stream counts (1, 2, 4, 8, 1, 2, ...), so that a slower minute of a
    # shared machine falls on every count alike rather than on one
    runs: dict[int, list] = {B: [] for B in streams}
    for r in range(args.repeat):
        for B in streams:
            runs[B].append((in_process(eng, B, args.prompt, args.gen, r),
                            (None, None, None) if args.no_serve else served(eng, B, args.prompt, args.gen)))
    for B in streams:
        local = max(x for x, _ in runs[B])
        http = max((h for _, h in runs[B]), key=lambda f: f[1] or 0)
        by = decode_bytes(cfg, ctx, eng.dtype, B)
        shared = by["attention"] + by["router"] + by["unembedding"] + by["norms"]
        E, k = cfg.n_experts, cfg.n_experts_per_token
        rows.append({"streams": B, "in_process_tok_s": local, "served_tok_s": http[1], "served_e2e_tok_s": http[0],
                     "client_cores": http[2],
                     "experts_per_layer": E * (1 - (1 - k / E) ** B), "shared_gb": shared / 1e9,
                     "experts_gb": by["experts"] / 1e9, "step_gb": sum(by.values()) / 1e9,
                     "gb_per_token": sum(by.values()) / B / 1e9})
    base = rows[0]
    print(f"{args.preset} widths, {args.layers} layers, {eng.dtype}, {args.device}, prompt {args.prompt}, "
          f"gen {args.gen}, best of {args.repeat}")
    print("streams  in-process tok/s (x1)  served tok/s (x1)  served e2e (x1)  client cores  experts/layer"
          "  shared GB  experts GB  GB/token")

    def cell(r: dict, key: str, width: int) -> str:
        if not r[key]:
            return "-".center(width)
        return f"{r[key]:{width - 8}.1f} ({r[key] / base[key]:.2f}x)"

    def cores(r: dict) -> str:
        return "-" if r["client_cores"] is None else f"{r['client_cores']:.2f}"

    for r in rows:
        print(f"{r['streams']:7d}  {cell(r, 'in_process_tok_s', 21)}  {cell(r, 'served_tok_s', 17)}"
              f"  {cell(r, 'served_e2e_tok_s', 15)}  {cores(r):>12}"
              f"  {r['experts_per_layer']:13.1f}  {r['shared_gb']:9.3f}"
              f"  {r['experts_gb']:10.3f}  {r['gb_per_token']:8.3f}")
    print(json.dumps({"preset": args.preset, "layers": args.layers, "dtype": str(eng.dtype), "rows": rows}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--clients"]:           # the client process of ``served``
        url, B, prompt, gen = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(clients(url, B, prompt, gen)))
    else:
        main()

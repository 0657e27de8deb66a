"""CPU speed with a busy neighbour: the default thread count against one thread (issue 26).

On a machine that something else also uses, threads that wait for each other lose their time
slices to the neighbour: a parallel phase waits for its slowest thread, and a thread that spins
while it waits takes the core the other one needs. This script runs, alternating, ``gptoss chat
--prompt --json`` (decode tok/s) and ``gptoss bench`` (prefill and decode tok/s) with the default
threads and with ``GPTOSS_THREADS=1``, each while N busy-loop processes run beside it, and prints
a Markdown table of the means over the runs (each run's value in brackets).

    python benchmarks/cpu_contention.py --model tiny-random --busy 0,1,2 --runs 3
    # two checkouts, alternating too (LABEL=COMMAND):
    python benchmarks/cpu_contention.py --gptoss "before=env PYTHONPATH=/tmp/base python -m gptoss_cli" \
        --gptoss "after=python -m gptoss_cli"

``--busy 0`` is the single-stream speed without a neighbour of ours (other users of the machine
still count: the load average is printed with the table). Prints JSON of every figure as its last
line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a message in a bottle, "
          "with three chapters and a surprising ending.")
BUSY = "while True: pass"


def _run_json(cmd: list[str], env: dict) -> dict:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)


def measure(gptoss: list[str], model: str, threads: str | None, tokens: int, prompt_len: int) -> dict:
    env = dict(os.environ)
    env.pop("GPTOSS_THREADS", None)
    if threads is not None:
        env["GPTOSS_THREADS"] = threads
    chat = _run_json(gptoss + ["chat", "--model", model, "--device", "cpu", "--prompt", PROMPT, "--json",
                               "--max-tokens", str(tokens), "--seed", "1"], env)
    bench = _run_json(gptoss + ["bench", "--model", model, "--device", "cpu", "--prompt-lens", str(prompt_len),
                                "--gen-tokens", str(tokens), "--repeat", "1", "--warmup", "1", "--format", "json"], env)
    r = bench["results"][0]
    return {"chat_decode": chat["stats"]["decode_tok_s"], "bench_decode": r["decode_tok_s"]["mean"],
            "bench_prefill": r["prefill_tok_s"]["mean"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--gptoss", action="append", help="[LABEL=]COMMAND to run, e.g. 'python -m gptoss_cli' "
                    "(default gptoss); several alternate with each other")
    ap.add_argument("--busy", default="0,1,2", help="comma-separated numbers of busy-loop neighbours")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--threads", default="default,1", help="thread settings to alternate ('default' = unset)")
    a = ap.parse_args()
    commands = {}
    for spec in a.gptoss or ["gptoss"]:
        label, _, cmd = spec.partition("=") if "=" in spec.split()[0] else ("", "", spec)
        commands[label or cmd] = shlex.split(cmd)
    settings = [None if t == "default" else t for t in a.threads.split(",")]
    results: dict[tuple[str, int, str], list[dict]] = {}
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    for busy in (int(b) for b in a.busy.split(",")):
        for run in range(a.runs):
            for label, gptoss in commands.items():
                for threads in settings:      # alternating, so a change in the machine's load hits all
                    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
                    try:
                        time.sleep(0.3 if busy else 0)
                        fig = measure(gptoss, a.model, threads, a.tokens, a.prompt_len)
                    finally:
                        for h in hogs:
                            h.kill()
                            h.wait()
                    results.setdefault((label, busy, threads or "default"), []).append(fig)
                    print(f"{label}: busy {busy} threads {threads or 'default'} run {run + 1}: {fig}",
                          file=sys.stderr, flush=True)
    end = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    print(f"model {a.model}, {os.cpu_count()} CPUs, load average before {' '.join(load)}, after {' '.join(end)}; "
          f"prompt {a.prompt_len}, {a.tokens} generated; mean of {a.runs} runs [each run]\n")
    print("| checkout | neighbours | threads | chat decode tok/s | bench decode tok/s | bench prefill tok/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (label, busy, threads), figs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = []
        for key in ("chat_decode", "bench_decode", "bench_prefill"):
            vals = [f[key] for f in figs]
            cells.append(f"{statistics.mean(vals):,.0f} [{', '.join(f'{v:,.0f}' for v in vals)}]")
        print(f"| {label} | {busy} | {threads} | " + " | ".join(cells) + " |")
    print(json.dumps({"model": a.model, "load_before": load, "load_after": end,
                      "results": [{"checkout": c, "busy": b, "threads": t, "runs": f}
                                  for (c, b, t), f in results.items()]}))


if __name__ == "__main__":
    main()

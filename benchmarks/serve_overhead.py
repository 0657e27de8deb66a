"""What ``gptoss serve`` costs per token over calling the engine in process.

One engine, two ways, interleaved run by run: ``Engine.generate`` of ``--gen`` tokens in process,
and the same request through ``Server`` (uvicorn on a loopback port, in this process) as a streamed
chat completion read with httpx. Both prompts are the same rendered conversation and both ignore
stop tokens, so both generate exactly ``--gen`` tokens; the server's figure is what a client sees
(completion tokens over the wall time of the whole request, HTTP and SSE included). The ratio of
the medians is the server's overhead; the last line is one JSON object.

Run (CPU is enough: the overhead is per token, on the host):
    python benchmarks/serve_overhead.py --model tiny-random --device cpu --gen 200 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx
import uvicorn

from gptoss_cli.engine import Engine
from gptoss_cli.harmony import Conversation, Message, render_completion
from gptoss_cli.serve import Server, bind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gen", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    engine = Engine.load(args.model, device=args.device, max_context=args.gen + 256)
    server = Server(engine, "m")
    sock = bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning"))
    threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
    text = "Count to one hundred."
    prompt = render_completion(Conversation(messages=[Message("user", text)]), engine.tokenizer)
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": args.gen,
            "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}

    def in_process() -> float:
        t0 = time.perf_counter()
        n = sum(1 for _ in engine.generate(prompt, max_new_tokens=args.gen, temperature=0))
        return n / (time.perf_counter() - t0)

    def served(client) -> float:
        t0, n = time.perf_counter(), 0
        with client.stream("POST", url, json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    n = json.loads(line[6:])["usage"]["completion_tokens"]
        return n / (time.perf_counter() - t0)

    local, remote = [], []
    with httpx.Client(timeout=600) as client:
        served(client), in_process()                       # warm-up, not counted
        for _ in range(args.repeat):
            local.append(in_process())
            remote.append(served(client))
    uv.should_exit = True
    result = {"device": str(engine.device), "model": args.model, "gen": args.gen, "repeat": args.repeat,
              "in_process_tok_s": statistics.median(local), "served_tok_s": statistics.median(remote),
              "served_over_in_process": statistics.median(remote) / statistics.median(local),
              "values": {"in_process": local, "served": remote}}
    print(f"in process {result['in_process_tok_s']:.1f} tok/s, served {result['served_tok_s']:.1f} tok/s "
          f"({100 * result['served_over_in_process']:.1f}%), medians of {args.repeat} interleaved runs")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

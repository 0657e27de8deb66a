"""Perplexity of a text file scored the way llama.cpp's ``llama-perplexity`` scores it.

Why: a correctness cross-check against another engine on the same checkpoint. ``gptoss eval
perplexity=FILE`` uses strided windows (transformers' method); llama-perplexity cuts the tokens
into ``len // ctx`` back-to-back chunks of ``ctx`` tokens, runs each as a fresh sequence and
scores only the second half: the logits at positions ``ctx/2 .. ctx-2`` against the tokens that
follow them (``tools/perplexity/perplexity.cpp``, ``first = n_ctx/2``). This script does exactly
that with ``Engine.logits``, so the two figures differ only by the engines' arithmetic (and by
tokenization, which it prints so it can be compared with llama-perplexity's log).

    python benchmarks/perplexity_chunks.py --model CKPT --text FILE --ctx 256 --chunks 6 --dtype bfloat16
    llama-perplexity -m CKPT.gguf -f FILE -c 256 --chunks 6 -t 2 -b 256

The last line is one JSON object: ppl, nll, scored tokens, chunks, tokens, the path that ran.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from gptoss_cli.engine import Engine


def chunked_nll(engine: Engine, tokens: list[int], ctx: int, chunks: int | None, bos: int | None):
    """(sum of NLL, tokens scored, chunks run), llama-perplexity's scheme (see the docstring)."""
    n_chunks = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    first = ctx // 2
    nll, scored = 0.0, 0
    for i in range(n_chunks):
        chunk = tokens[i * ctx:(i + 1) * ctx]
        inputs = [bos] + chunk[1:] if bos is not None else chunk      # llama.cpp puts BOS first
        logits = engine.logits(inputs)                                 # [ctx, vocab] float32
        rows = logits[first:ctx - 1].double()
        targets = torch.tensor(chunk[first + 1:ctx]).unsqueeze(1)
        nll += float((rows.logsumexp(-1) - rows.gather(1, targets).squeeze(1)).sum())
        scored += ctx - 1 - first
        print(f"[{i + 1}] ppl so far {math.exp(nll / scored):.4f}", flush=True)
    return nll, scored, n_chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bos", type=int, default=None, help="token id llama.cpp puts first in each chunk, if its vocab adds one")
    args = ap.parse_args()

    # logits of ctx tokens need one spare slot of context
    eng = Engine.load(args.model, device=args.device, dtype=args.dtype, max_context=args.ctx + 1)
    with open(args.text, encoding="utf-8") as f:
        tokens = eng.tokenizer.encode_ordinary(f.read())
    print(f"{len(tokens)} tokens; first ids {tokens[:8]}")
    t0 = time.perf_counter()
    nll, scored, n = chunked_nll(eng, tokens, args.ctx, args.chunks, args.bos)
    info = eng.runtime_info()
    print(json.dumps({"ppl": math.exp(nll / scored), "nll": nll, "scored": scored, "chunks": n, "ctx": args.ctx,
                      "tokens": len(tokens), "seconds": round(time.perf_counter() - t0, 2),
                      "dtype": info["dtype"], "ops": info["ops"]}))


if __name__ == "__main__":
    main()

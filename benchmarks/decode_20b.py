"""Prefill and decode of a random-weight gpt-oss in the real 20b shape, on one GPU.

What it measures: one ``Engine.generate`` call with a ``--prompt-len`` token prompt (prefill, the
time to the first token) and ``--gen`` greedy tokens (decode, the tokens after the first). Decode
at batch 1 is bound by memory bandwidth, so the decode rate is also reported as a share of the
roofline ``bandwidth / bytes read per token`` (DESIGN.md 5), with the bandwidth measured on the
same device in the same run (a large device-to-device copy). The weights are random MXFP4 noise
in the real shapes (``Engine.random``): the work per token is that of the real model, the tokens
are meaningless.

Which path ran is printed with the figures (``Engine.runtime_info``: ops, kernels, CUDA graph),
and the last line is one JSON object for machines.

Run on a GPU:
    python benchmarks/decode_20b.py                       # triton kernels + CUDA graph
    python benchmarks/decode_20b.py --no-graph            # same kernels, eager decode step
    GPTOSS_KERNELS=0 python benchmarks/decode_20b.py      # PyTorch reference ops (slow)
    python benchmarks/decode_20b.py --profile             # + the top kernels of one decode step
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from gptoss_cli.config import PRESETS, ModelConfig
from gptoss_cli.engine import Engine


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeat: int = 10) -> float:
    """Device memory bandwidth in bytes/s from a large copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    return 2 * nbytes * repeat / (start.elapsed_time(end) / 1e3)


def bytes_per_token(cfg: ModelConfig, context: int, act_bytes: int = 2) -> dict[str, float]:
    """Bytes one decode step reads at ``context`` tokens (weights and KV cache; activations are
    negligible at batch 1)."""
    D, F, dh = cfg.d_model, cfg.d_ff, cfg.d_head
    attn = (D * cfg.qkv_dim + cfg.qkv_dim + cfg.q_dim * D + D) * act_bytes
    mxfp4 = 4.25 / 8                                        # 4-bit codes + one byte per 32
    experts = cfg.n_experts_per_token * ((2 * F * D + D * F) * mxfp4 + (2 * F + D) * act_bytes)
    router = (cfg.n_experts * D + cfg.n_experts) * act_bytes
    kv = sum(min(context, cfg.sliding_window) if w else context for w in cfg.windowed_layers)
    kv *= 2 * cfg.n_kv_heads * dh * act_bytes
    unembed = cfg.vocab_size * D * act_bytes
    per_layer = attn + experts + router
    return {"weights": cfg.n_layers * per_layer + unembed, "kv_cache": kv,
            "total": cfg.n_layers * per_layer + unembed + kv}


def memory_needed(cfg: ModelConfig, context: int, act_bytes: int = 2) -> float:
    """Bytes a random-weight engine of ``cfg`` needs on the device: the weights (experts packed at
    4.25 bits, the rest in the activation dtype), the KV cache, and 4 GB for prefill activations,
    the logits and the allocator's slack. gpt-oss-120b at 2k: ~66 GB, so an 80 GB H100 holds it."""
    counts = cfg.param_counts()
    dense = sum(v for k, v in counts.items() if k not in ("experts", "active_experts"))
    kv = 2 * cfg.n_layers * context * cfg.n_kv_heads * cfg.d_head * act_bytes
    return counts["experts"] * 4.25 / 8 + dense * act_bytes + kv + 4e9


def profile_step(eng: Engine, tok: int, pos: int, top: int = 15) -> list[dict]:
    """CUDA time per kernel over one decode step, run eagerly (a replayed graph hides them)."""
    from torch.profiler import ProfilerActivity, profile

    decoder = eng._decoder
    graph = decoder is not None and decoder.use_graph
    if graph:
        decoder.use_graph = False              # the same step, eagerly, so each kernel shows
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng._step(tok, pos)
            torch.cuda.synchronize()
    finally:
        if graph:
            decoder.use_graph = True
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:top]
    return [{"name": r.key[:80], "calls": r.count, "cuda_us": round(r.device_time_total, 1)} for r in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt-oss-20b", choices=sorted(PRESETS))
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--no-graph", action="store_true", help="run the decode step eagerly")
    ap.add_argument("--repeat", type=int, default=2, help="runs after a warm-up run; best is kept")
    ap.add_argument("--profile", action="store_true", help="list the top kernels of one decode step")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2

    cfg = PRESETS[args.preset]
    ctx = args.prompt_len + args.gen + 16
    need, have = memory_needed(cfg, ctx), torch.cuda.get_device_properties(0).total_memory
    if need > have:        # a clear skip, not an out-of-memory error minutes in
        print(f"skipped: {args.preset} at {ctx} tokens needs ~{need / 1e9:.0f} GB, the GPU has {have / 1e9:.0f} GB")
        return 3
    t0 = time.perf_counter()
    eng = Engine.random(cfg, device="cuda", dtype=args.dtype, max_context=ctx, seed=0,
                        cuda_graph=not args.no_graph)
    load_s = time.perf_counter() - t0
    info = eng.runtime_info()
    dev = eng.device
    bw = measure_bandwidth(dev)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()

    runs = []
    for i in range(args.repeat + 1):                         # run 0: warm-up (compiles, graph)
        eng._reset()
        torch.cuda.synchronize(dev)
        out = list(eng.generate(prompt, max_new_tokens=args.gen, temperature=0))
        torch.cuda.synchronize(dev)
        st = eng.last_stats
        if i:
            runs.append({"prefill_s": st.prefill_s, "first_token_s": st.first_token_s,
                         "decode_tokens": st.decode_tokens, "decode_s": st.decode_s})
    best_prefill = min(r["first_token_s"] for r in runs)
    best = min(runs, key=lambda r: r["decode_s"])
    decode_tps = best["decode_tokens"] / best["decode_s"]
    mid_ctx = args.prompt_len + args.gen // 2
    bpt = bytes_per_token(cfg, mid_ctx, act_bytes=2 if args.dtype == "bfloat16" else 4)
    roofline_tps = bw / bpt["total"]
    result = {
        "benchmark": "decode_20b", "preset": args.preset, "prompt_len": args.prompt_len,
        "gen_tokens": args.gen, "dtype": args.dtype,
        "prefill_tok_s": args.prompt_len / best_prefill, "time_to_first_token_s": best_prefill,
        "decode_tok_s": decode_tps, "decode_ms_per_token": 1e3 / decode_tps,
        "bandwidth_GBps": bw / 1e9, "bytes_per_token": bpt, "roofline_tok_s": roofline_tps,
        "roofline_share": decode_tps / roofline_tps,
        "achieved_GBps": decode_tps * bpt["total"] / 1e9, "load_s": load_s,
        "peak_allocated_GB": torch.cuda.max_memory_allocated(dev) / 1e9,
        "system": info, "runs": runs, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
    }
    if args.profile:
        result["decode_step_profile"] = profile_step(eng, out[-1], len(prompt) + len(out) - 1)

    print(f"device   {info['device_name']}  ({info['dtype']}, ops={info['ops']}, cuda_graph={info['cuda_graph']})")
    print(f"kernels  {', '.join(info.get('kernels', [])) or '-'}")
    print(f"prefill  {args.prompt_len} tokens: {best_prefill * 1e3:.1f} ms to the first token "
          f"({result['prefill_tok_s']:.0f} tok/s)")
    print(f"decode   {decode_tps:.1f} tok/s ({result['decode_ms_per_token']:.2f} ms/token) = "
          f"{100 * result['roofline_share']:.1f}% of the roofline {roofline_tps:.0f} tok/s "
          f"({bpt['total'] / 1e9:.2f} GB/token at {bw / 1e9:.0f} GB/s measured)")
    for row in result.get("decode_step_profile", []):
        print(f"  {row['cuda_us']:9.1f} us  {row['calls']:4d}x  {row['name']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# `gptoss chat --prompt` against `gptoss bench` on CPU: the same checkpoint, the same prompt length,
# one after the other, so that the figures a user sees in the chat can be checked against the bench.
#
# Usage: CKPT=path/to/checkpoint benchmarks/cpu_chat_vs_bench.sh
# Settings (environment): CKPT (required), OUT (default ./cpu-chat-vs-bench), RUNS (3),
#   TOKENS (64 generated), GPTOSS (the gptoss command), PYTHON.
# Prints a Markdown table: prefill tok/s, time to first token and decode tok/s of each chat run
# and the bench's mean over RUNS repeats at the prompt length the chat's prompt rendered to.

set -euo pipefail
: "${CKPT:?give CKPT=path/to/checkpoint}"
OUT=${OUT:-./cpu-chat-vs-bench}
RUNS=${RUNS:-3}
TOKENS=${TOKENS:-64}
GPTOSS=${GPTOSS:-gptoss}
PYTHON=${PYTHON:-python}
TEXT="Write a long, detailed story about a lighthouse keeper who finds a message in a bottle, with three chapters, vivid descriptions of the sea and the weather, and a surprising ending that ties the chapters together. Keep the language simple."
mkdir -p "$OUT"
for i in $(seq 1 "$RUNS"); do
    "$GPTOSS" chat -m "$CKPT" --device cpu --prompt "$TEXT" --max-tokens "$TOKENS" --json 2>/dev/null > "$OUT/chat-$i.json"
done
P=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['stats']['prompt_tokens'])" "$OUT/chat-1.json")
"$GPTOSS" bench --model "$CKPT" --device cpu --prompt-lens "$P" --gen-tokens "$TOKENS" --repeat "$RUNS" \
    --format json --output "$OUT/bench.json" > /dev/null
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
chats = [json.loads(p.read_text())["stats"] for p in sorted(out.glob("chat-*.json"))]
bench = json.loads((out / "bench.json").read_text())
r = bench["results"][0]
print(f"prompt {chats[0]['prompt_tokens']} tokens, {r['gen_tokens']} generated, {bench['system']['dtype']}, {bench['system']['ops']}")
print("| | prefill tok/s | ttft ms | decode tok/s |")
print("| --- | --- | --- | --- |")
for i, c in enumerate(chats, 1):
    print(f"| gptoss chat --prompt, run {i} | {c['prefill_tok_s']:.1f} | {c['time_to_first_token_s'] * 1e3:.0f} | {c['decode_tok_s']:.2f} |")
values = ", ".join(f"{v:.2f}" for v in r["decode_tok_s"]["values"])
print(f"| gptoss bench, {len(r['runs'])} runs (mean; decode {values}) | {r['prefill_tok_s']['mean']:.1f} | "
      f"{r['ttft_ms']['mean']:.0f} | {r['decode_tok_s']['mean']:.2f} |")
PY

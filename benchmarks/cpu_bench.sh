#!/usr/bin/env bash
# gpt-oss-20b on a CPU, side by side with llama.cpp, in one run on one machine.
#
# What it does:
#   1. writes random weights in gpt-oss-20b's real shapes, with LAYERS of its 24 layers (default 4:
#      4.2 GB on disk; our engine in bfloat16 and llama.cpp, run one after the other, each hold about
#      that much, so both fit a 24 GB machine shared with others), in the hub's HF layout with the
#      tokenizer, into $WORK/ckpt-20b-${LAYERS}l (kept: a second run reuses it);
#   2. runs `gptoss bench --device cpu` on it at prompts 128 and 512 with 64 generated tokens,
#      3 repeats (DTYPES: bfloat16 float32 by default);
#   3. given LLAMA_BENCH=path/to/llama-bench and GGUF=path/to/that-checkpoint.gguf, interleaves
#      `llama-bench -p 128,512 -n 64 -t $THREADS -r 3` on the same checkpoint between our runs,
#      ROUNDS times (default 2), so both engines see the same machine load.
# Nothing here builds or converts with llama.cpp: build it and convert the checkpoint yourself
# (its convert_hf_to_gguf.py keeps the experts in MXFP4); PERF.md says how it was done.
#
# Results: $WORK/results-<UTC time>/ holds each run's JSON (ours: gptoss-bench/1, llama-bench's
# own -o json) and summary.md, a table of prefill and decode tok/s of every run.
#
# Usage:
#   benchmarks/cpu_bench.sh
#   LLAMA_BENCH=/work/llama/build/bin/llama-bench GGUF=/work/bench/ckpt.gguf benchmarks/cpu_bench.sh
# Settings (environment): WORK (default ./cpu-bench), LAYERS (4), DTYPES ("bfloat16 float32"),
#   ROUNDS (2), THREADS (default: the cores this shell may use), GPTOSS (the gptoss command).

set -euo pipefail

WORK=${WORK:-./cpu-bench}
LAYERS=${LAYERS:-4}
DTYPES=${DTYPES:-"bfloat16 float32"}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-$(nproc)}
GPTOSS=${GPTOSS:-gptoss}
PYTHON=${PYTHON:-python}
CKPT="$WORK/ckpt-20b-${LAYERS}l"
OUT="$WORK/results-$(date -u +%Y%m%dT%H%M%SZ)"

if [[ -n "${LLAMA_BENCH:-}" || -n "${GGUF:-}" ]]; then
    [[ -x "${LLAMA_BENCH:-}" ]] || { echo "cpu_bench: LLAMA_BENCH=${LLAMA_BENCH:-} is not an executable llama-bench (give LLAMA_BENCH and GGUF together)" >&2; exit 2; }
    [[ -f "${GGUF:-}" ]] || { echo "cpu_bench: GGUF=${GGUF:-} is not a file (give LLAMA_BENCH and GGUF together)" >&2; exit 2; }
fi
mkdir -p "$OUT"

if [[ ! -f "$CKPT/config.json" ]]; then
    echo "== writing random gpt-oss-20b weights, $LAYERS layers, HF layout, into $CKPT"
    "$PYTHON" - "$CKPT" "$LAYERS" <<'EOF'
import sys
from gptoss_cli.config import PRESETS
from gptoss_cli.synthetic import write_checkpoint
write_checkpoint(sys.argv[1], PRESETS["gpt-oss-20b"].replace(n_layers=int(sys.argv[2])), layout="hf", shards=1)
EOF
fi

export GPTOSS_THREADS=$THREADS
{
    echo "# cpu_bench $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, threads $THREADS"
    echo "checkpoint: $CKPT (random gpt-oss-20b weights, $LAYERS layers)"
    [[ -n "${GGUF:-}" ]] && echo "gguf: $GGUF; llama-bench: $LLAMA_BENCH"
    echo
} > "$OUT/summary.md"

for round in $(seq 1 "$ROUNDS"); do
    for dtype in $DTYPES; do
        echo "== round $round: gptoss bench --device cpu --dtype $dtype"
        "$GPTOSS" bench --model "$CKPT" --device cpu --dtype "$dtype" --prompt-lens 128,512 --gen-tokens 64 \
            --repeat 3 --format table --output "$OUT/gptoss-$dtype-r$round.json"
    done
    if [[ -n "${LLAMA_BENCH:-}" ]]; then
        echo "== round $round: llama-bench -p 128,512 -n 64 -t $THREADS -r 3"
        "$LLAMA_BENCH" -m "$GGUF" -p 128,512 -n 64 -t "$THREADS" -r 3 -o json > "$OUT/llama-r$round.json"
    fi
done

"$PYTHON" - "$OUT" >> "$OUT/summary.md" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| engine | run | test | tok/s mean ± std | median | best |")
print("| --- | --- | --- | --- | --- | --- |")
def row(who, run, test, values):
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    print(f"| {who} | {run} | {test} | {statistics.mean(values):.2f} ± {std:.2f} | {statistics.median(values):.2f} | {max(values):.2f} |")
for path in sorted(out.glob("*.json")):
    res = json.loads(path.read_text())
    if isinstance(res, list):                                  # llama-bench -o json
        for r in res:
            test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
            row(f"llama.cpp {r.get('build_commit', '?')}", path.stem, test, r["samples_ts"])
        continue
    for r in res["results"]:
        who = f"gptoss {res['system']['dtype']}, {res['system'].get('ops', '?')}"
        row(who, path.stem, f"pp{r['prompt_len']}", r["prefill_tok_s"]["values"])
        row(who, path.stem, f"tg{r['gen_tokens'] - 1} after pp{r['prompt_len']}", r["decode_tok_s"]["values"])
EOF
echo "== summary: $OUT/summary.md"
cat "$OUT/summary.md"

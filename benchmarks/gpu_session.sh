#!/usr/bin/env bash
# Everything a lent H100/H200 should do for this project, in ONE device call of at most 10 minutes
# (a session has 15 minutes of device time in all, start-up included: there is no second try).
#
#   here, once:   bash benchmarks/prepare_gpu_session.sh          (fills the git-ignored .whl/)
#   device call:  run(carry=[".whl"], timeout_s=600, command="bash benchmarks/gpu_session.sh")
#
# In order, each step under its own time limit, later steps skipped when the clock runs short:
# versions; the offline install over the image's torch/triton; gptoss doctor (every fast op and
# the decode step against the PyTorch reference, 20b shapes); the kernel and CUDA engine tests;
# gpt-oss-20b decode/prefill with random weights drawn on the device (CUDA graph, eager, the
# PyTorch reference), at 2k, 8k and 32k of context; a per-kernel profile of one decode step;
# 120b when the GPU holds it. Logs and one JSON per benchmark go under $OUT; a table ends the
# output (the reply carries its tail).
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${GPU_SESSION_BUDGET_S:-560}               # leave the call's 600 s some slack
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export TIKTOKEN_ENCODINGS_BASE=$PWD/.whl HF_HUB_OFFLINE=1
SUMMARY=()

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

step() {   # step NAME LIMIT_S COMMAND...: run it if the time allows, log under $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -lt "$limit" ]; then
    SUMMARY+=("$(printf '%-22s skipped (%ss left, needs %ss)' "$name" "$(left)" "$limit")"); return
  fi
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 1 "$OUT/$name.log" | grep -q '^{' && tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
  SUMMARY+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$(grep -E 'passed|failed|decode  |prefill  | OK, [0-9]+ FAIL' "$OUT/$name.log" | tail -n 2 | tr '\n' ' ' | cut -c1-150)")")
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

# offline install over the image's own torch and triton (no build isolation, no dependencies)
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links=.whl pytest
python3 -c "import regex" 2>/dev/null || pip install -q --no-index --no-deps .whl/regex-*.whl
python3 -c "import tiktoken" 2>/dev/null || pip install -q --no-index --no-deps .whl/tiktoken-*.whl
pip install -q --no-index --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || {
  echo "editable install failed (see install.log): using PYTHONPATH"
  mkdir -p /tmp/pp && ln -sfn "$PWD/kernels/gptoss_kernels" /tmp/pp/gptoss_kernels && ln -sfn "$PWD/evals" /tmp/pp/gptoss_evals
  export PYTHONPATH="$PWD:/tmp/pp"; }

MEM_GB=$(python3 -c "import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30)" 2>/dev/null || echo 0)
B=benchmarks/decode_20b.py
# most important first: a step that would not fit in the time left is skipped, not cut short
# every fast op against its reference at 20b's shapes and the edges, the whole decode step (graph,
# eager, reference): the first run of our kernels on this GPU says here whether they are right
step doctor_20b          150 python3 -m gptoss_cli doctor --random-weights gpt-oss-20b
step tests_kernels       200 python3 -m pytest -q --maxfail=5 -p no:cacheprovider tests/test_kernels_moe.py \
                         tests/test_kernels_attention.py tests/test_kernels_rope.py tests/test_kernels_norm.py \
                         tests/test_kernels_launches.py tests/test_kernels_engine.py
step decode_20b_graph     90 python3 $B --gen 256 --repeat 2          # the first one compiles (cached after)
step decode_20b_profile   40 python3 $B --gen 16 --repeat 1 --profile
step decode_20b_eager     50 python3 $B --gen 128 --repeat 1 --no-graph
step kernels_20b_shapes   45 python3 benchmarks/kernels.py
step decode_20b_ctx8k     60 python3 $B --prompt-len 8192 --gen 128 --repeat 1
step decode_20b_reference 60 env GPTOSS_KERNELS=0 python3 $B --gen 16 --repeat 1
step decode_20b_ctx32k    70 python3 $B --prompt-len 32768 --gen 64 --repeat 1
if [ "$MEM_GB" -ge 100 ]; then
  step decode_120b_graph  90 python3 $B --preset gpt-oss-120b --gen 128 --repeat 1
else
  SUMMARY+=("decode_120b_graph      skipped (${MEM_GB} GiB: 120b needs an H200)")
fi

echo; echo "== gpu_session: $(( $(date +%s) - START )) s; logs and JSON in $OUT"
printf '%s\n' "${SUMMARY[@]}"

#!/usr/bin/env bash
# Everything a lent H100/H200 should do for this project, in ONE device call of at most 10 minutes
# (a session has 15 minutes of device time in all, start-up included: there is no second try).
#
#   here, once:   bash benchmarks/prepare_gpu_session.sh          (fills the git-ignored .whl/)
#   device call:  run(carry=[".whl"], timeout_s=600, command="bash benchmarks/gpu_session.sh")
#   dry run:      GPU_SESSION_DRY_RUN=1 OUT=/tmp/out bash benchmarks/gpu_session.sh   (any machine)
#
# The device tool brings back at most 8 files from $OUT, so the session writes exactly two there:
# gpu_session.tar.gz (every step's log and JSON, versions, the install log) and summary.md (one
# line a step, the headline figures), and prints summary.md last. Logs are written outside $OUT
# as the steps run; the archive and the summary are made on any exit, a cut-short run included.
#
# In order, each step under its own time limit (they sum to at most 540 s), a step that would not
# fit in the time left skipped rather than cut short: correctness first (gptoss doctor: every fast
# op and the decode step against the PyTorch reference at 20b's shapes; the kernel and CUDA
# engine tests; the decode GEMVs' instruction count with the image's Triton), then gpt-oss-20b
# decode at a 2k prompt (CUDA graph; prefill of the 2k prompt is in the same run), prefill of an
# 8k prompt, 1 and 8 streams of 20b decoded together (the batched engine), gpt-oss-120b (decode_20b.py skips it itself when the GPU cannot hold the ~69 GB it
# needs), decode at 32k, and a per-kernel profile of one decode step. Without a GPU (or with
# GPU_SESSION_DRY_RUN=1) every GPU step is listed as skipped and the two files are still made.
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
START=$(date +%s)
BUDGET=${GPU_SESSION_BUDGET_S:-560}               # leave the call's 600 s some slack
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export TIKTOKEN_ENCODINGS_BASE=$PWD/.whl HF_HUB_OFFLINE=1
ROWS=()

GPU=1
if [ "${GPU_SESSION_DRY_RUN:-0}" = 1 ] || ! nvidia-smi -L > /dev/null 2>&1; then GPU=0; fi

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

finish() {   # the two files the device tool brings back; the summary on stdout
  {
    echo "# gpu_session $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "Versions: $(tr "\n" " " < "$WORK/versions.txt" 2>/dev/null)"
    echo
    echo "| step | limit s | status | s | result |"
    echo "| --- | --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "$(( $(date +%s) - START )) s in all; logs and JSON in gpu_session.tar.gz"
  } > "$OUT/summary.md"
  tar -czf "$OUT/gpu_session.tar.gz" -C "$WORK" .
  echo; cat "$OUT/summary.md"
  rm -rf "$WORK"
}
trap finish EXIT

step() {   # step NAME LIMIT_S COMMAND...: run it if a GPU and the time allow, log in $WORK/NAME.log
  local name=$1 limit=$2; shift 2
  if [ "$GPU" = 0 ]; then
    ROWS+=("| $name | $limit | skipped: no GPU | 0 | |"); return
  fi
  if [ "$(left)" -lt "$limit" ]; then
    ROWS+=("| $name | $limit | skipped: $(left) s left | 0 | |"); return
  fi
  echo "== $name (limit ${limit} s)"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 1 "$WORK/$name.log" | grep -q '^{' && tail -n 1 "$WORK/$name.log" > "$WORK/$name.json"
  local status="rc $rc"
  [ "$rc" = 0 ] && status=ok
  [ "$rc" = 124 ] && status="timed out"
  [ "$rc" = 3 ] && status=skipped
  local result
  result=$(grep -E 'passed|failed|^decode  |^prefill  |OK, [0-9]+ FAIL|^skipped|sass_per_weight_value|^ +[0-9]+ +[0-9.]+ \(' "$WORK/$name.log" \
           | sed -E 's/.*"kernel": "([^"]*)".*"dtype": "bf16".*"sass_per_weight_value": ([0-9.]+).*/\1 bf16 \2 SASS a value/' \
           | grep -v '"dtype"' | tail -n 2 | tr '\n|' ' /' | cut -c1-160)
  ROWS+=("| $name | $limit | $status | $(( $(date +%s) - t0 )) | $result |")
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
} > "$WORK/versions.txt" 2>&1
cat "$WORK/versions.txt"

if [ "$GPU" = 1 ]; then
  # offline install over the image's own torch and triton (no build isolation, no dependencies)
  python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links=.whl pytest
  python3 -c "import regex" 2>/dev/null || pip install -q --no-index --no-deps .whl/regex-*.whl
  python3 -c "import tiktoken" 2>/dev/null || pip install -q --no-index --no-deps .whl/tiktoken-*.whl
  pip install -q --no-index --no-deps --no-build-isolation -e . > "$WORK/install.log" 2>&1 || {
    echo "editable install failed (see install.log): using PYTHONPATH"
    mkdir -p /tmp/pp && ln -sfn "$PWD/kernels/gptoss_kernels" /tmp/pp/gptoss_kernels && ln -sfn "$PWD/evals" /tmp/pp/gptoss_evals
    export PYTHONPATH="$PWD:/tmp/pp"; }
fi

B=benchmarks/decode_20b.py
# correctness first: the first run of our kernels on this GPU says here whether they are right
step doctor_20b          100 python3 -m gptoss_cli doctor --random-weights gpt-oss-20b
step tests_kernels       100 python3 -m pytest -q --maxfail=5 -p no:cacheprovider tests/test_kernels_moe_decode.py \
                         tests/test_kernels_moe.py tests/test_kernels_attention.py tests/test_kernels_rope.py \
                         tests/test_kernels_norm.py tests/test_kernels_engine.py tests/test_kernels_rows.py \
                         tests/test_kernels_moe_batch.py
step gemv_budget          20 env PYTHONPATH="$PWD/tests:${PYTHONPATH:-}" python3 tests/kernels_budget.py
step decode_20b_2k        70 python3 $B --gen 256 --repeat 2          # the first run compiles (cached after)
step prefill_20b_8k       50 python3 $B --prompt-len 8192 --gen 16 --repeat 1
# issue 23's target: 8 streams of 20b decoded together, total tok/s beside one stream's
step batch_20b_1_8        40 python3 benchmarks/batch_decode.py --device cuda --layers 24 --streams 1,8 \
                         --gen 129 --repeat 2 --no-serve         # the first round compiles and captures
step decode_120b_2k       80 python3 $B --preset gpt-oss-120b --gen 128 --repeat 1
step decode_20b_32k       50 python3 $B --prompt-len 32768 --gen 64 --repeat 1
step decode_20b_profile   30 python3 $B --gen 16 --repeat 1 --profile

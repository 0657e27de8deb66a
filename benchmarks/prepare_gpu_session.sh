#!/usr/bin/env bash
# On the CPU machine (network), from the project's root: fill the git-ignored .whl/ with what the
# lent GPU image lacks (it has Python 3.12, torch, triton, transformers, safetensors, typer, rich,
# and no network): pytest, tiktoken, regex wheels for cp312 x86_64, and the o200k_base ranks
# (checked against their sha256) that the tokenizer needs offline. About 7 MB; the recipe is the
# one tested in shared/gpu/. Then run the session in one device call:
#   run(carry=[".whl"], timeout_s=600, command="bash benchmarks/gpu_session.sh")
set -euo pipefail
mkdir -p .whl
pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "pytest>=8" pluggy iniconfig pygments packaging "tiktoken>=0.7" regex
if [ ! -f .whl/o200k_base.tiktoken ]; then
  tmp=$(mktemp -d)
  pip download -q --no-deps --only-binary=:all: -d "$tmp" "bpe-openai>=0.1.4"
  python3 - "$tmp" <<'PY'
import glob, gzip, hashlib, sys, zipfile
z = zipfile.ZipFile(glob.glob(sys.argv[1] + "/bpe_openai-*.whl")[0])
data = gzip.decompress(z.read("bpe_openai/data/o200k_base.tiktoken.gz"))
assert hashlib.sha256(data).hexdigest() == "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
open(".whl/o200k_base.tiktoken", "wb").write(data)
PY
  rm -rf "$tmp"
fi
du -sh .whl

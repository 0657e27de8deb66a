"""Shared fixtures: tiny random gpt-oss checkpoints in the real hub layouts.

The checkpoints use the real vocabulary (201088), 4 layers, a hidden size of 64 and a window of
16 so that short prompts cross it; experts are random MXFP4 codes and scales (``synthetic.py``).
"""

from __future__ import annotations

import os

import torch

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, so set it before any kernel module
# is imported: without a GPU the kernel tests run under Triton's interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing in the tests reaches the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from gptoss_cli.config import PRESETS  # noqa: E402
from gptoss_cli.synthetic import write_checkpoint  # noqa: E402

TINY = PRESETS["tiny"]

try:                    # triton is Linux-only (pyproject): elsewhere the kernel tests do not apply
    import triton  # noqa: F401
except ImportError:
    collect_ignore_glob = ["test_kernels_*.py"]


@pytest.fixture(scope="session")
def tiny_full(tmp_path_factory):
    """A full hub download: HF layout in two shards with an index, and ``original/``."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-full"), TINY, layout="both", shards=2, seed=1, tokenizer=False)


@pytest.fixture(scope="session")
def tiny_hf_single(tmp_path_factory):
    """HF layout in one ``model.safetensors``, no index (same weights as ``tiny_full``)."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-hf1"), TINY, layout="hf", shards=1, seed=1, tokenizer=False)


@pytest.fixture(scope="session")
def hf_oracle(tiny_full):
    """transformers' GptOssForCausalLM on the tiny checkpoint, float32 (the test oracle)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers.GptOssForCausalLM.from_pretrained(str(tiny_full), dtype=torch.float32).eval()

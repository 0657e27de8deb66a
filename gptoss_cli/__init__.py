"""gptoss: a terminal and a PyTorch + Triton runtime for OpenAI's gpt-oss models."""

import os

__version__ = "0.1.0"

# Two thread pools take turns in every CPU decode step: PyTorch's OpenMP workers and the native
# library's (cpu_ops). By default OpenMP keeps its workers spinning for a while after each op, and
# on a machine with few cores they take the cores the native workers need next: on 2 cores, the
# logits of 8 sequences then one PyTorch op took 3.4 ms with spinning workers and 1.7 ms without
# (PERF.md, "The batched decode step"). OpenMP reads this once, when PyTorch loads it, so it is
# set here, before anything of ours imports torch; a policy the user chose stays.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

"""gptoss: a terminal and a PyTorch + Triton runtime for OpenAI's gpt-oss models."""

import os

__version__ = "0.1.0"

# PyTorch's OpenMP threads (libgomp) spin 300,000 rounds before they sleep when they wait for each
# other. Beside a busy process the spinning thread takes the core the other one needs: the default
# threads ran 4-26x slower than one thread (issue 26). And two pools take turns in every CPU decode
# step, OpenMP's and the native library's (cpu_ops): on 2 cores the logits of 8 sequences then one
# PyTorch op took 3.4 ms with spinning workers, 1.7 ms without (issue 23). Decoding at once was as
# fast or faster everywhere measured, prefill within 3% (PERF.md). libgomp reads this once, when
# torch loads it: set here, so that the command line, the benchmarks and any program importing
# gptoss_cli before torch get it; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

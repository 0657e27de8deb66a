"""CPU threads on a machine that something else also uses (issue 26).

Two causes made the default threads 4-26x slower than one thread beside a busy process, each
checked here by what the threads do, not by timing them (the figures are in PERF.md,
``benchmarks/cpu_contention.py``):
- the native library's pool gave each thread a fixed share of a phase, so the phase waited for a
  worker the OS had not given a core; now the caller takes the parts no worker has started;
- PyTorch's OpenMP threads spin (libgomp: 300,000 rounds) before they sleep, taking the core the
  other thread needs; the CLI asks them to sleep at once (``OMP_WAIT_POLICY=PASSIVE``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux scheduling calls")

# In a subprocess: the whole process on one CPU, the library's worker at SCHED_IDLE there, so it
# runs only while the caller sleeps. A phase that waits for the worker's share lets it run (half
# the work); a phase whose caller takes the parts nobody started never sleeps, and the worker
# gets (almost) nothing. Prints the CPU time of each, and whether the result equals one thread's.
POOL = r"""
import json, os, threading, torch
torch.set_num_threads(1)                      # no OpenMP threads: every new thread is the pool's
from gptoss_cli import cpu_ops, ops
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})      # inherited by threads made later
g = torch.Generator().manual_seed(0)
N, E, D, F, k = 8, 8, 512, 512, 4
x = torch.randn(N, D, generator=g)
router_w, router_b = torch.randn(E, D, generator=g) / 20, torch.zeros(E)
w1b = torch.randint(0, 256, (E, 2 * F, D // 32, 16), dtype=torch.uint8, generator=g)
w1s = torch.full((E, 2 * F, D // 32), 120, dtype=torch.uint8)
w2b = torch.randint(0, 256, (E, D, F // 32, 16), dtype=torch.uint8, generator=g)
w2s = torch.full((E, D, F // 32), 120, dtype=torch.uint8)
args = (x, router_w, router_b, w1b, w1s, torch.zeros(E, 2 * F), w2b, w2s, torch.zeros(E, D), k, 7.0)
os.environ[cpu_ops.THREADS_ENV] = "1"
one = cpu_ops.moe(*args)
os.environ[cpu_ops.THREADS_ENV] = "2"
before = set(os.listdir("/proc/self/task"))
two = cpu_ops.moe(*args)                      # starts the pool's worker
workers = sorted(set(os.listdir("/proc/self/task")) - before)
for tid in workers:
    os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
def cpu_ns(tid):
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])
me = str(threading.get_native_id())
w0, m0 = sum(cpu_ns(t) for t in workers), cpu_ns(me)
same = all(torch.equal(cpu_ops.moe(*args), one) for _ in range(40))
print(json.dumps({"workers": len(workers), "worker_ns": sum(cpu_ns(t) for t in workers) - w0,
                  "caller_ns": cpu_ns(me) - m0, "same": same and torch.equal(two, one)}))
"""


def test_a_worker_without_a_core_does_not_hold_up_the_phase():
    from gptoss_cli import cpu_ops

    if cpu_ops.status().startswith("pytorch-reference"):
        pytest.skip(f"no native library here: {cpu_ops.status()}")
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_THREADS"}
    r = subprocess.run([sys.executable, "-c", POOL], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["workers"] == 1 and out["same"], out
    # the caller did the phases; the idle-class worker ran only in the gaps (waking, finding no part)
    assert out["worker_ns"] < 0.1 * out["caller_ns"], out


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_cli_lets_waiting_openmp_threads_sleep(given, expected):
    """Set before torch loads libgomp (it reads the variable once); a user's own value is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import sys, os, gptoss_cli.cli; print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", expected]

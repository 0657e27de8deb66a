"""The last program to finish a piece of work does its epilogue: a counter per piece of work.

Several kernels split one output over many programs so that a batch-1 step fills the GPU (the
MoE's experts, the router's experts, the split-K attention's key ranges), then need one program to
combine the parts. A second launch for that costs microseconds at batch 1 (DESIGN.md 5), so each
program instead stores its part, bumps an int32 counter for its piece of work, and the program
that sees the count reach ``n_parts - 1`` combines the parts and sets the counter back to zero:
the classic "threadfence reduction" of the CUDA samples, also how stream-K GEMMs fix up tiles.

The combine always reads the parts in the same order, so results do not depend on which program
finishes last (runs and CUDA-graph replays give identical bits). The counters live in one zeroed
buffer per device, allocated once and never freed, so a captured graph's address stays valid;
each kernel leaves its counters at zero, so kernels on one stream can share them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

COUNTER_SLOTS = 1 << 16
_COUNTERS: dict[str, torch.Tensor] = {}


def counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``n`` counters on ``device`` (the same one every call)."""
    if n > COUNTER_SLOTS:
        raise ValueError(f"{n} counters asked for, {COUNTER_SLOTS} exist: split the launch")
    key = str(device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return _COUNTERS[key]


@triton.jit
def arrive(Counter, n_parts):
    """Call after storing this program's part: True in exactly one program of the ``n_parts``
    that share ``Counter``, the last to arrive, which then sees every part (acquire) and must
    call ``reset`` when done. The barrier orders all of this program's threads' stores before
    the release."""
    tl.debug_barrier()
    return tl.atomic_add(Counter, 1, sem="acq_rel") == n_parts - 1


@triton.jit
def reset(Counter):
    tl.atomic_xchg(Counter, 0)

"""The last program to finish a piece of work does its epilogue: a counter per piece of work.

Several kernels split one output over many programs so that a batch-1 step fills the GPU (the
MoE's experts and K parts, the router's experts, the split-K attention's key ranges), then need
one program to combine the parts. A second launch for that costs microseconds at batch 1
(DESIGN.md 5), so each program instead stores its part, bumps an int32 counter for its piece of
work, and the program that sees the count reach ``n_parts - 1`` combines the parts and sets the
counter back to zero: the classic "threadfence reduction" of the CUDA samples, also how stream-K
GEMMs fix up tiles.

The combine always reads the parts in the same order, so results do not depend on which program
finishes last (runs and CUDA-graph replays give identical bits). Each kernel leaves its counters
at zero, so kernels that run one after the other on one stream can share a buffer; kernels that
may run at the same time (two engines, an engine's captured graph beside another stream's work)
must not, or one's arrivals would count toward the other's "last program". So the buffer belongs
to its user: an engine allocates its own with ``new_counters`` when it is built (before any
graph capture: a captured kernel keeps the address) and runs its forward passes inside
``using(buffer)``; kernels take the buffer in force (``counters``), or outside any ``using`` one
zeroed buffer per device (direct kernel calls: tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import triton
import triton.language as tl

COUNTER_SLOTS = 1 << 16
_DEFAULT: dict[str, torch.Tensor] = {}
_IN_FORCE: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("gptoss_counters", default=None)


def new_counters(device: torch.device) -> torch.Tensor:
    """A zeroed int32 buffer of ``COUNTER_SLOTS`` counters on ``device``, for one user."""
    return torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)


@contextlib.contextmanager
def using(buffer: torch.Tensor):
    """Kernels launched inside the block (on ``buffer``'s device) count with ``buffer``. The
    setting is per thread (a context variable), so two engines in two threads keep theirs."""
    token = _IN_FORCE.set(buffer)
    try:
        yield buffer
    finally:
        _IN_FORCE.reset(token)


def counters(device: torch.device, n: int) -> torch.Tensor:
    """The zeroed int32 counters in force for ``device`` (``using``), else the device's default
    buffer (the same one every call); at least ``n`` of them."""
    if n > COUNTER_SLOTS:
        raise ValueError(f"{n} counters asked for, {COUNTER_SLOTS} exist: split the launch")
    buffer = _IN_FORCE.get()
    if buffer is not None and buffer.device == torch.device(device):
        return buffer
    key = str(device)
    if key not in _DEFAULT:
        _DEFAULT[key] = new_counters(device)
    return _DEFAULT[key]


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

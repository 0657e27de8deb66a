"""How many kernels one static decode step launches per layer (issue #12: at most 8).

At batch 1 a layer's weights stream in ~36 us on an H100 and every launch, even replayed from a
CUDA graph, costs a few microseconds (DESIGN.md 5), so the count is a design figure. It is
counted here without a GPU: the step runs on CPU tensors with the kernels forced on, under
Triton's interpreter. A Triton launch counts one; so does every PyTorch op that would be a CUDA
kernel (not views, not allocations), caught with a ``TorchDispatchMode``; a matmul with a bias on
one row counts two, as CUDA's ``addmm`` then copies the bias into the output first (cuBLASLt's
bias epilogue is taken only for more than one row). Models of 1, 2 and 3
layers give the cost of a full-attention layer (layer 1) and of a windowed one (layer 2).
"""

from __future__ import annotations

import os

import pytest
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import interpreter

from gptoss_cli import ops
from gptoss_cli.config import PRESETS
from gptoss_cli.engine import DecodeStep, Engine

MAX_LAUNCHES_PER_LAYER = 8
_BIASED_MATMULS = {"linear", "addmm"}


def _bias(name, args):
    """The bias of a linear/addmm call, if any (addmm's comes first)."""
    if name == "addmm":
        return args[0]
    return args[2] if len(args) > 2 else None
# ops that allocate or re-view memory: no kernel on a GPU
_FREE = {"empty", "empty_strided", "empty_like", "new_empty", "detach", "lift_fresh", "alias"}

_RUN = interpreter.InterpretedFunction.run
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="kernels on CPU tensors need TRITON_INTERPRET=1")


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches: list[str] = []
        self.in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_triton and not func.is_view and name not in _FREE:
            self.launches.append(name)
            rows = args[1 if name == "addmm" else 0]
            if name in _BIASED_MATMULS and _bias(name, args) is not None and rows.numel() == rows.shape[-1]:
                self.launches.append("bias copy")   # CUDA addmm at M = 1: no Lt epilogue, a copy first
        return func(*args, **(kwargs or {}))


def _count_step(n_layers: int, monkeypatch) -> list[str]:
    monkeypatch.setenv(ops.KERNELS_ENV, "1")
    cfg = PRESETS["tiny"].replace(n_layers=n_layers)
    eng = Engine.random(cfg, device="cpu", dtype="float32", max_context=600)   # > 256 keys: split-K
    step = DecodeStep(eng.model, eng.cache, graph=False)
    step(5, 3)                                           # the first call may set things up
    counter = LaunchCounter()
    run = _RUN

    def counted(self, *args, **kwargs):
        counter.launches.append(self.fn.__name__)
        counter.in_triton += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            counter.in_triton -= 1

    with monkeypatch.context() as m:
        m.setattr(interpreter.InterpretedFunction, "run", counted)
        with counter:
            step(6, 4)
    return counter.launches


@pytest.mark.slow
def test_decode_step_launches_per_layer(monkeypatch):
    one, two, three = (_count_step(n, monkeypatch) for n in (1, 2, 3))
    full, windowed = len(two) - len(one), len(three) - len(two)
    detail = f"full layer {full}, windowed layer {windowed}; one-layer step: {one}"
    assert full <= MAX_LAUNCHES_PER_LAYER and windowed <= MAX_LAUNCHES_PER_LAYER, detail

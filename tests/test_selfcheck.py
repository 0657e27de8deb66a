"""The fast ops checked against their references on this machine: ``gptoss doctor``, the load
check, its cache and the fallback (``selfcheck.py``, ``doctor.py``).

The broken kernels here are the native CPU ops (``cpu_ops``) with their output perturbed, or made
to raise: what a kernel miscompiled for a new machine would do. The Triton kernels run under the
interpreter (``TRITON_INTERPRET=1``, set by conftest without a GPU).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from gptoss_cli import cpu_ops, doctor, ops, selfcheck
from gptoss_cli.cli import app
from gptoss_cli.config import PRESETS
from gptoss_cli.engine import Engine

TINY = PRESETS["tiny"]
PROMPT = [(7919 * i + 13) % 200000 for i in range(21)]
NATIVE = ("moe", "attention", "rope_store", "rmsnorm", "add_rmsnorm", "add_rmsnorm_route", "linear",
          "attention_rows", "rope_store_rows")


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch, tmp_path):
    """The check on, results cached in a folder of this test's own, no fallback left over."""
    monkeypatch.setenv("GPTOSS_CHECK", "1")
    monkeypatch.setenv("GPTOSS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GPTOSS_KERNELS", raising=False)
    selfcheck._DONE.clear()
    ops.clear_fallbacks()
    yield
    selfcheck._DONE.clear()
    ops.clear_fallbacks()


def _native_or_skip():
    if cpu_ops._library()[0] is None:
        pytest.skip("the native CPU library cannot be built here")


def _perturbed(fn):
    def broken(*args, **kwargs):
        out = fn(*args, **kwargs)
        return out * 1.05 + 0.01
    return broken


def _raises(*args, **kwargs):
    raise RuntimeError("illegal instruction in the fast path")


BROKEN = {"moe": ("moe", lambda: _perturbed(cpu_ops.moe)), "attention": ("attention", lambda: _raises)}


def test_doctor_on_the_native_cpu_ops_exits_0():
    """The issue's own command: the table, every native op in it, OK, exit 0."""
    _native_or_skip()
    done = subprocess.run([sys.executable, "-m", "gptoss_cli", "doctor", "--random-weights", "tiny", "--device", "cpu",
                           "--steps", "8"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "doctor · random weights in tiny's shapes" in out and "torch " + torch.__version__ in out
    assert "cpu-native" in out and "GB/s" in out
    for op in NATIVE:
        assert any(line.startswith(op + " ") and " OK " in line for line in out.splitlines()), op
    assert "decode step" in out and " 0 FAIL" in out and "FAIL " not in out
    assert "[1/" in done.stderr                                   # progress on stderr


def test_doctor_on_the_triton_kernels_under_the_interpreter(monkeypatch):
    """Every Triton kernel, at tiny shapes with the edges (window crossing, ring wrap, live 1,
    128 experts, a NaN router logit), against its reference; then the whole decode step."""
    pytest.importorskip("triton")
    monkeypatch.setenv("GPTOSS_KERNELS", "1")
    engine = Engine.random(TINY, device="cpu", dtype="float32", max_context=128, check=False)
    results = selfcheck.check_ops(engine.model)
    bad = [r.why() for r in results if not r.ok]
    assert not bad, bad
    assert {r.op for r in results} == set(ops.KERNEL_TABLE)
    labels = " | ".join(r.label for r in results)
    for edge in ("1 token", "ring wrapped", "live 1", "128 experts", "NaN router logit", "window 16",
                 "3 sequences + 2 padding, full", "3 sequences + 2 padding, ring", "32 sequences"):
        assert edge in labels, edge
    step = doctor.decode_step_checks(engine, steps=4)
    assert [r.ok for r in step] == [True], [r.why() for r in step]


@pytest.mark.parametrize("broken", ["moe", "attention"])
def test_doctor_names_a_broken_op_and_exits_non_zero(broken, monkeypatch):
    _native_or_skip()
    name, make = BROKEN[broken]
    monkeypatch.setattr(cpu_ops, name, make())
    result = CliRunner().invoke(app, ["doctor", "--random-weights", "tiny", "--device", "cpu", "--dtype", "float32",
                                      "--context", "256", "--steps", "4", "--format", "json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    failed = {r["op"] for r in report["results"] if not r["ok"]}
    assert broken in failed and report["ok"] is False
    if broken == "attention":
        assert any("illegal instruction" in (r["error"] or "") for r in report["results"])
    assert f"checks failed ({broken}" in result.stderr or f"checks failed (decode step, {broken}" in result.stderr


@pytest.mark.parametrize("broken", ["moe", "attention"])
def test_engine_with_a_broken_op_falls_back_and_answers_as_the_reference(broken, tiny_full, monkeypatch):
    _native_or_skip()
    name, make = BROKEN[broken]
    monkeypatch.setenv("GPTOSS_KERNELS", "0")
    reference = list(Engine.load(tiny_full, device="cpu", dtype="float32").generate(PROMPT, 24, temperature=0))
    monkeypatch.delenv("GPTOSS_KERNELS")
    monkeypatch.setattr(cpu_ops, name, make())
    with pytest.warns(RuntimeWarning, match=f"the fast {broken} failed its check"):
        engine = Engine.load(tiny_full, device="cpu", dtype="float32")
    assert set(engine.fallbacks) == {broken}
    assert broken in engine.runtime_info()["fallbacks"]
    assert list(engine.generate(PROMPT, 24, temperature=0)) == reference
    # the ops that passed still run natively
    assert ops.fast_impl("rmsnorm", torch.device("cpu")) is not None and "rmsnorm" not in ops.fallbacks("cpu")


def test_no_check_keeps_the_raw_path(tiny_full, monkeypatch):
    _native_or_skip()
    monkeypatch.setattr(cpu_ops, "moe", _perturbed(cpu_ops.moe))
    monkeypatch.setenv("GPTOSS_CHECK", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Engine.load(tiny_full, device="cpu", dtype="float32").fallbacks == {}
    monkeypatch.setenv("GPTOSS_CHECK", "1")
    assert Engine.load(tiny_full, device="cpu", dtype="float32", check=False).fallbacks == {}
    assert not ops.fallbacks("cpu")


def test_the_result_is_cached_and_the_key_follows_the_versions(tiny_full, monkeypatch):
    _native_or_skip()
    runs = []
    real = selfcheck.check_ops
    monkeypatch.setattr(selfcheck, "check_ops", lambda *a, **k: runs.append(1) or real(*a, **k))
    engine = Engine.load(tiny_full, device="cpu", dtype="float32")
    key, facts = selfcheck._key(engine.model)
    assert runs == [1] and selfcheck._cache_file(key).exists()
    assert facts["device_name"] and facts["torch"] == torch.__version__ and facts["shapes"]["d_model"] == TINY.d_model
    selfcheck._DONE.clear()                                      # a new process: the disk answers
    Engine.load(tiny_full, device="cpu", dtype="float32")
    assert runs == [1]
    for module in (selfcheck, torch):
        with monkeypatch.context() as m:
            m.setattr(module, "__version__", "99.0")
            assert selfcheck._key(engine.model)[0] != key
    assert selfcheck._key(engine.model)[0] == key
    monkeypatch.setattr(selfcheck, "__version__", "99.0")
    selfcheck._DONE.clear()
    Engine.load(tiny_full, device="cpu", dtype="float32")
    assert runs == [1, 1]                                         # another version: checked anew


def test_a_cached_failure_falls_back_without_running_again(tiny_full, monkeypatch):
    _native_or_skip()
    monkeypatch.setattr(cpu_ops, "moe", _perturbed(cpu_ops.moe))
    with pytest.warns(RuntimeWarning):
        Engine.load(tiny_full, device="cpu", dtype="float32")
    ops.clear_fallbacks()
    selfcheck._DONE.clear()
    monkeypatch.setattr(selfcheck, "check_ops", lambda *a, **k: pytest.fail("ran again"))
    with pytest.warns(RuntimeWarning, match="the fast moe failed"):
        assert set(Engine.load(tiny_full, device="cpu", dtype="float32").fallbacks) == {"moe"}


def test_the_command_line_says_it_in_one_line(tiny_full, monkeypatch):
    """chat, serve and eval load through ``load_engine``: one warning line and the header's ops,
    no Python warning with its source line."""
    _native_or_skip()
    from gptoss_cli.loading import load_engine

    monkeypatch.setattr(cpu_ops, "moe", _perturbed(cpu_ops.moe))
    buf = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # a Python warning would raise here
        load_engine(str(tiny_full), "cpu", "float32", 256, yes=True, err=Console(file=buf, width=300))
    text = buf.getvalue()
    assert "(reference: moe)" in text
    lines = [line for line in text.splitlines() if line.startswith("warning: the fast moe failed its check")]
    assert len(lines) == 1 and "gptoss doctor" in lines[0]


def test_the_load_check_is_quick_and_keeps_real_widths():
    """The quick set: one decode and one short prefill per op, at the model's own widths (the
    experts cut to 256 + F mod 256 outputs only when F is wider than that)."""
    cfg = PRESETS["small"]
    engine = Engine.random(cfg, device="cpu", dtype="float32", max_context=512, check=False)
    quick = selfcheck.cases(engine.model, quick=True)
    assert {c.op for c in quick} == set(ops.OPS)
    assert all(c.rows <= 16 for c in quick)
    moe = [c for c in quick if c.op == "moe"]
    assert moe[0].args[0].shape[-1] == cfg.d_model and moe[0].args[3].shape[1] == 2 * cfg.d_ff   # 256 wide: uncut
    assert len(selfcheck.cases(engine.model)) > 2 * len(quick)


def test_a_context_shorter_than_three_windows_is_checked_within_it():
    """The ring-wrap cases put positions where RoPE's table has rows: a 40-position context with
    a 16-slot window (3 windows + 5 = 53 would be past it) checks every op, all OK."""
    _native_or_skip()
    engine = Engine.random(TINY, device="cpu", dtype="float32", max_context=40, check=False)
    results = selfcheck.check_ops(engine.model)
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]
    assert any("capped at 39" in r.label for r in results if r.op == "rope_store_rows")

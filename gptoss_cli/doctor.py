"""``gptoss doctor``: every fast op against its PyTorch reference on this machine, timed.

What llama.cpp's ``test-backend-ops`` is to its backends: the first user on a new GPU (or a CPU
without AVX-512) is the first real test of a kernel, so the tool tests itself there. The cases
and the comparison are ``selfcheck``'s full set (real shapes and edges: one token, a prompt
crossing the window, ring wrap, live length 1, 128 experts, a NaN router logit); each row gives
the error against its tolerance, the time per call, and GB/s with its share of the copy bandwidth
measured in the same run (``bench.measure_bandwidth``).

Then the whole decode step: the fast step against the reference step (every op on its reference,
``ops.references_only``), teacher-forced on the reference's greedy tokens so that one near-tie
cannot derail the rest, and on CUDA the CUDA-graph step against the same step run eagerly (their
greedy tokens must be equal). On a CPU at gpt-oss's width the reference MoE dequantises whole
experts, seconds a token, so that check runs the first 2 layers for 16 steps; the row says so.

The header says what ran; progress goes to stderr; the exit code is 1 when a row fails.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, ops, selfcheck
from .engine import Engine, GenerationStats
from .errors import GptossError

DEFAULT_PRESET = "gpt-oss-20b"
# ||fast - ref|| / ||ref|| of a step's logits: float32 is exact up to summation order; in 16 bits the
# two round at different places and the difference compounds over layers and cached keys (a broken
# op is off by order one; the greedy tokens are held equal wherever the margin allows)
STEP_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class CheckFailed(GptossError):
    """At least one fast op gave another answer than its reference (or raised)."""


def run(model: str | None, random_weights: str | None, device: str, dtype: str, context: int,
        fmt: str, steps: int | None) -> dict:
    """Load (or draw) the model, check every op and the decode step, print the report."""
    if fmt not in ("table", "json"):
        raise GptossError(f"unknown --format {fmt!r}", "use table or json")
    if model and random_weights:
        raise GptossError("give --model or --random-weights, not both")
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    engine, what = _engine(model, random_weights or (None if model else DEFAULT_PRESET), device, dtype, context, err)
    report = {"system": _system(engine, what), "results": []}
    err.print("[dim]measuring the copy bandwidth…[/]")
    from .bench import measure_bandwidth

    copy_gbps = measure_bandwidth(engine.device)["gbps"]
    report["system"]["copy_gbps"] = round(copy_gbps, 1)

    def progress(i: int, n: int, case) -> None:
        err.print(f"[dim][{i + 1}/{n}] {escape(case.op)}: {escape(case.label)}[/]")

    results = selfcheck.check_ops(engine.model, quick=False, time_it=True, progress=progress)
    if not results:
        report["system"]["note"] = "no op has a fast implementation here: every op runs its PyTorch reference"
    else:
        err.print("[dim]the whole decode step…[/]")
        results += decode_step_checks(engine, steps)
    for r in results:
        row = asdict(r)
        row["copy_share"] = r.gbps / copy_gbps if r.gbps and copy_gbps else None
        report["results"].append(row)
    report["ok"] = all(r.ok for r in results)
    if fmt == "json":
        print(json.dumps(report))                      # one line: the last line of a log is the report
    else:
        _print_table(report)
    failed = [r for r in results if not r.ok]
    if failed:
        names = sorted({r.op for r in failed})
        raise CheckFailed(f"{len(failed)} of {len(results)} checks failed ({', '.join(names)})",
                          "chat, bench, serve and eval run those ops' PyTorch references on this machine: "
                          "right answers, slower")
    return report


def _engine(model, preset_name, device, dtype, context, err: Console) -> tuple[Engine, str]:
    from .config import preset
    from .engine import pick_device

    with err.status("Loading the model…", spinner="dots"):
        if preset_name:
            cfg = full = preset(preset_name)
            what = f"random weights in {preset_name}'s shapes"
            if pick_device(device).type == "cpu" and _reference_is_slow(cfg) and cfg.n_layers > 2:
                # what the CPU checks use (see _step_model): no need to draw the other layers
                cfg = cfg.replace(n_layers=2, windowed_layers=cfg.windowed_layers[:2])
                what += f", its first 2 of {full.n_layers} layers"
            return Engine.random(cfg, device, dtype, min(context, cfg.max_context), check=False), what
        from .resolve import resolve_model

        folder = resolve_model(model)
        return Engine.load(folder, device, dtype, context, check=False), f"{model} ({folder})"


def _system(engine: Engine, what: str) -> dict:
    info = engine.runtime_info()
    system = {"model": what, "device": info["device"], "device_name": info["device_name"],
              "driver": info.get("driver"), "torch": info["torch"], "triton": info["triton"],
              "gptoss": __version__, "dtype": info["dtype"], "ops": info["ops"],
              "context": engine.max_context}
    if engine.device.type == "cpu" and ops.use_cpu_native(engine.device):
        from .cpu_ops import SMALL_MAX_ROWS

        system["scope"] = (f"the native CPU ops take up to {SMALL_MAX_ROWS} token rows (the MoE any number): "
                           "longer prompts run the PyTorch reference itself, so there is nothing to compare")
    return system


# ---- the whole decode step ------------------------------------------------------------------------
def _step_model(engine: Engine):
    """The model the step check runs: the whole one, or on a CPU at a width where the reference
    MoE costs seconds a token, its first 2 layers."""
    model = engine.model
    cfg = model.cfg
    if engine.device.type == "cuda" or not _reference_is_slow(cfg) or cfg.n_layers <= 2:
        return model, None
    cut = copy.copy(model)
    cut.cfg = cfg.replace(n_layers=2, windowed_layers=cfg.windowed_layers[:2])
    cut.blocks = model.blocks[:2]
    return cut, f"first 2 of {cfg.n_layers} layers"


def _reference_is_slow(cfg) -> bool:
    """Whether the reference MoE, which dequantises whole experts, takes seconds a token on a CPU
    at this width (gpt-oss's 2880 x 2880 does; the test presets do not)."""
    return cfg.d_model * cfg.d_ff >= (1 << 20)


def _greedy(engine: Engine, prompt: list[int], steps: int, forced: list[int] | None = None):
    """Float32 logits after the prompt and after each of ``steps`` tokens, and the tokens fed:
    the greedy ones, or ``forced``. Computed from scratch (no prefix reuse)."""
    engine._reset()
    logits = engine._prefill(prompt, GenerationStats())
    out, fed, pos = [logits.float().cpu().clone()], [], len(prompt)
    t0 = time.perf_counter()
    for i in range(steps):
        tok = forced[i] if forced is not None else int(torch.argmax(logits))
        logits = engine._step(tok, pos)
        fed.append(tok)
        out.append(logits.float().cpu().clone())
        pos += 1
    return torch.stack(out), fed, (time.perf_counter() - t0) / max(1, steps)


def decode_step_checks(engine: Engine, steps: int | None = None) -> list[selfcheck.Result]:
    """The fast decode step against the reference one (and on CUDA the graph against eager)."""
    model, cut = _step_model(engine)
    slow = engine.device.type == "cpu" and _reference_is_slow(model.cfg)
    steps = steps or (16 if slow else 64)
    W = model.cfg.sliding_window
    n_prompt = min(W + 22, engine.max_context - steps - 1)     # crosses the window: the ring wraps
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (n_prompt,), generator=g).tolist()
    where = f"prompt {n_prompt} + {steps} steps" + (f", {cut}" if cut else "")
    with ops.references_only(engine.device):
        ref_engine = Engine(model, check=False)
        ref_logits, tokens, _ = _greedy(ref_engine, prompt, steps)
    del ref_engine
    results = []
    fast = Engine(model, check=False, cuda_graph=True)
    try:
        fast_logits, _, step_s = _greedy(fast, prompt, steps, forced=tokens)
    except Exception as e:  # noqa: BLE001  (a broken kernel's error, reported as its row)
        return [selfcheck.Result("decode step", f"fast vs reference, {where}", False, tol=STEP_TOL[engine.dtype],
                                 error=selfcheck.one_line(e))]
    results.append(_compare_steps("decode step", f"fast vs reference, {where}", fast_logits, ref_logits,
                                  STEP_TOL[engine.dtype], step_s * 1e6))
    if fast._decoder is not None and fast._decoder.use_graph:
        eager = Engine(model, check=False, cuda_graph=False)
        eager_logits = _greedy(eager, prompt, steps, forced=tokens)[0]
        graph_tokens = _greedy(fast, prompt, steps)[1]
        eager_tokens = _greedy(eager, prompt, steps)[1]
        r = _compare_steps("decode step", f"CUDA graph vs eager, {where}", fast_logits, eager_logits,
                           STEP_TOL[engine.dtype], None)
        if graph_tokens != eager_tokens:
            r.ok, r.note = False, "greedy tokens differ"
        results.append(r)
    return results


def _compare_steps(op: str, label: str, fast: torch.Tensor, ref: torch.Tensor, tol: float,
                   us: float | None) -> selfcheck.Result:
    """Per-step logits [steps+1, V]: the worst step's ||fast - ref|| / ||ref||, and the greedy
    tokens, which must agree wherever the reference's top two are further apart than the error."""
    diff = (fast - ref).nan_to_num(float("inf"))
    rel = (diff.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max().item()
    max_abs = diff.abs().max().item()
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * diff.abs().max(dim=-1).values
    agree = fast.argmax(-1) == ref.argmax(-1)
    bad = int((clear & ~agree).sum())
    note = f"greedy token differs at {bad} step(s)" if bad else f"greedy tokens equal at {int(agree.sum())}/{len(agree)}"
    return selfcheck.Result(op, label, rel <= tol and not bad, max_abs, rel, tol, note=note, us=us)


# ---- output ---------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _print_table(report: dict) -> None:
    """The header, then one row per check: errors, OK/FAIL, µs per call, GB/s and its share of the
    copy bandwidth; a note (or what the fast op raised) goes on a line of its own under its row."""
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=120)             # a log file: no folding at 80
    s = report["system"]
    tols = sorted({r["tol"] for r in report["results"] if r["op"] != "decode step"})
    out.print(f"gptoss {s['gptoss']} doctor · {escape(s['model'])}", soft_wrap=True)
    out.print(f"{escape(str(s['device']))} ({escape(str(s['device_name']))}) · driver {s['driver'] or '-'} · torch "
              f"{s['torch']} · triton {s['triton'] or '-'} · {s['dtype']} · ops {escape(str(s['ops']))} · "
              f"copy {s['copy_gbps']} GB/s", soft_wrap=True)
    if s.get("note"):
        out.print(s["note"], soft_wrap=True)
        return
    if s.get("scope"):
        out.print(s["scope"], soft_wrap=True)
    out.print(f"rel err: max |fast - reference| / max |reference|, tolerance {', '.join(f'{t:.0e}' for t in tols)}"
              " (the decode step: the logits' norms, its tolerance in its note)", soft_wrap=True)
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    for name, justify in (("op", "left"), ("case", "left"), ("max abs", "right"), ("rel err", "right"),
                          ("", "left"), ("µs/call", "right"), ("GB/s", "right"), ("copy", "right")):
        table.add_column(name, justify=justify, overflow="fold", no_wrap=name in ("op", ""))
    for r in report["results"]:
        status = "[green]OK[/]" if r["ok"] else "[bold red]FAIL[/]"
        table.add_row(r["op"], escape(r["label"]), _fmt(r["max_abs"], ".0e"), _fmt(r["rel"], ".0e"), status,
                      _fmt(r["us"], ",.0f"), _fmt(r["gbps"], ".1f"),
                      _fmt(r["copy_share"] and 100 * r["copy_share"], ".0f") + ("%" if r["copy_share"] else ""))
        note = r["error"] or r["note"]
        if r["op"] == "decode step":
            note = f"tolerance {r['tol']:.0e}; {note}"
        if note:                                           # under its row
            table.add_row("", f"[{'red' if r['error'] else 'dim'}]↳ {escape(note)}[/]")
    out.print(table)
    n_bad = sum(not r["ok"] for r in report["results"])
    out.print(f"{len(report['results']) - n_bad} OK, {n_bad} FAIL")
    sys.stdout.flush()

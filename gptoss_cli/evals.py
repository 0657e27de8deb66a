"""``gptoss eval``: run suites at each reasoning effort, grade, report, gate CI on the scores.

For every suite (``suites.py``) and every ``--effort``, each problem is sampled ``--samples`` times
through the chat path (``ChatSession``: Harmony rendering, the engine, the streaming parser) and
graded (``graders.py``); perplexity suites score text with ``Engine.logits`` instead. Each sample
has its own seed, derived from ``(--seed, suite, id, sample index, effort)``, so the order in which
samples run, and a resumed run, change nothing: the same model, seed and suites give the same
report (timings aside). The system message carries a fixed date (``EVAL_DATE``) for that reason.

The report (``--output``, JSON, ``REPORT_SCHEMA``) is rewritten atomically after every sample
(temporary file + rename), so Ctrl-C loses at most the sample in flight; running the same command
again keeps the samples already there and runs only the missing ones. A report written with other
settings, or on another dtype or kind of device, is never overwritten. Its fields:

- ``version``: 1.
- ``settings``: model, suites (as given), efforts, seed, samples, limit, temperature, max_tokens,
  context, ppl_window, ppl_stride, current_date; with ``--endpoint``, also endpoint (and model is
  the served model's name). A resume needs these to be equal.
- ``runtime``: ``Engine.runtime_info()`` (device, dtype, ops, versions); ``random_weights``. With
  ``--endpoint`` (``endpoint.py``): endpoint, model, device ``endpoint:...``, and what the server
  tells of itself. Perplexity suites need the model in process and are refused there.
- ``scores``: one entry per suite x effort. Graded suites: ``n`` samples, ``correct``,
  ``accuracy``, ``ci_low``/``ci_high`` (Wilson score interval, 95%), ``mean_reasoning_tokens``,
  ``tokens_per_s`` (generated tokens over generation wall time). Perplexity suites (``effort``
  null): ``perplexity`` = exp(mean NLL of the scored tokens), ``nll``, ``n_tokens`` (tokens of
  text), ``scored_tokens``, ``window``, ``stride``, ``tokens_per_s``.
- ``samples``: every sample: suite, effort, id, sample (index), seed, prompt (the user message),
  reasoning, answer, tool_calls, raw (text that was not well-formed Harmony), malformed (the
  parser's complaints), stop_reason, grade {correct, extracted, expected, reason} (null for
  perplexity), tokens {prompt, reasoning, answer, generated; perplexity: text, scored}, nll
  (perplexity only), seconds. A prompt that does not fit ``--context`` is graded incorrect with
  that reason (stop_reason ``context``).
- ``gate``: fail_under, max_perplexity, passed, failures (one line each; ``["incomplete"]`` while
  samples are missing). Gate options are not settings: rerunning a finished report with another
  ``--fail-under`` runs nothing and only re-gates it.

Gating: ``--fail-under`` applies to every graded suite x effort accuracy; perplexity suites are
not gated by it, but by ``--max-perplexity``. Either failing exits with status 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import MAX_TEMPERATURE
from .errors import ContextFullError, GptossError, why_not_written
from .harmony import EFFORTS, Malformed
from .records import context_record, graded_record
from .suites import Problem, Suite, load_suite, read_text, specs

REPORT_VERSION = 1
EVAL_DATE = "2025-08-05"     # the system message's "Current date" in every eval: no drift by day
Z95 = 1.959963984540054      # standard normal quantile for a two-sided 95% interval

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_SCORE_GRADED = {
    "type": "object",
    "required": ["suite", "effort", "kind", "n", "correct", "accuracy", "ci_low", "ci_high",
                 "mean_reasoning_tokens", "tokens_per_s"],
    "properties": {"suite": {"type": "string"}, "effort": {"enum": list(EFFORTS)}, "kind": {"const": "accuracy"},
                   "n": {"type": "integer"}, "correct": {"type": "integer"}, "accuracy": _NUM,
                   "ci_low": _NUM, "ci_high": _NUM, "mean_reasoning_tokens": _NUM, "tokens_per_s": _NUM_OR_NULL},
}
_SCORE_PPL = {
    "type": "object",
    "required": ["suite", "effort", "kind", "n", "perplexity", "nll", "n_tokens", "scored_tokens", "window", "stride"],
    "properties": {"suite": {"type": "string"}, "effort": {"type": "null"}, "kind": {"const": "perplexity"},
                   "n": {"type": "integer"}, "perplexity": _NUM_OR_NULL, "nll": _NUM, "n_tokens": {"type": "integer"},
                   "scored_tokens": {"type": "integer"}, "window": {"type": "integer"},
                   "stride": {"type": "integer"}, "tokens_per_s": _NUM_OR_NULL},
}
# The --output report (JSON Schema, draft 2020-12); documented above and in README.md.
REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["version", "settings", "runtime", "random_weights", "scores", "samples", "gate"],
    "properties": {
        "version": {"const": REPORT_VERSION},
        "settings": {
            "type": "object",
            "required": ["model", "suites", "efforts", "seed", "samples", "limit", "temperature",
                         "max_tokens", "context", "ppl_window", "ppl_stride", "current_date"],
            "properties": {
                "model": {"type": "string"}, "suites": {"type": "array", "items": {"type": "string"}},
                "efforts": {"type": "array", "items": {"enum": list(EFFORTS)}},
                "seed": {"type": "integer"}, "samples": {"type": "integer", "minimum": 1},
                "limit": {"type": ["integer", "null"]}, "temperature": _NUM,
                "max_tokens": {"type": "integer"}, "context": {"type": "integer"},
                "ppl_window": {"type": ["integer", "null"]}, "ppl_stride": {"type": ["integer", "null"]},
                "current_date": {"type": "string"},
            },
        },
        "runtime": {"type": "object", "required": ["device", "dtype"]},
        "random_weights": {"type": "boolean"},
        "scores": {"type": "array", "items": {"oneOf": [_SCORE_GRADED, _SCORE_PPL]}},
        "samples": {"type": "array", "items": {
            "type": "object",
            "required": ["suite", "effort", "id", "sample", "seed", "prompt", "reasoning", "answer",
                         "tool_calls", "raw", "malformed", "stop_reason", "grade", "tokens", "seconds"],
            "properties": {
                "suite": {"type": "string"}, "effort": {"enum": [*EFFORTS, None]},
                "id": {"type": "string"}, "sample": {"type": "integer"}, "seed": {"type": "integer"},
                "prompt": {"type": "string"}, "reasoning": {"type": "string"}, "answer": {"type": "string"},
                "tool_calls": {"type": "array", "items": {"type": "object", "required": ["recipient", "arguments"]}},
                "raw": {"type": "string"}, "malformed": {"type": "array", "items": {"type": "string"}},
                "stop_reason": {"type": "string"},
                "grade": {"oneOf": [{"type": "null"}, {
                    "type": "object", "required": ["correct", "extracted", "expected", "reason"],
                    "properties": {"correct": {"type": "boolean"}, "reason": {"type": "string"}}}]},
                "tokens": {"type": "object", "additionalProperties": {"type": "integer"}},
                "nll": _NUM, "seconds": _NUM,
            },
        }},
        "gate": {
            "type": "object", "required": ["fail_under", "max_perplexity", "passed", "failures"],
            "properties": {"fail_under": _NUM_OR_NULL, "max_perplexity": _NUM_OR_NULL,
                           "passed": {"type": "boolean"}, "failures": {"type": "array", "items": {"type": "string"}}},
        },
    },
}


# ---- small pure pieces ----------------------------------------------------------------------


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def sample_seed(seed: int, suite: str, problem_id: str, index: int, effort: str | None) -> int:
    """A per-sample seed from what identifies the sample, not from the order of the run."""
    digest = hashlib.sha256(f"{seed}|{suite}|{problem_id}|{index}|{effort}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def parse_fraction(text: str | None, option: str) -> float | None:
    """``0.7`` or ``70%`` -> 0.7; a value outside 0..1 is an error."""
    if text is None:
        return None
    t = str(text).strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise GptossError(f"{option} {text!r} is not a number", f"e.g. {option} 0.7 or {option} 70%") from None
    if not 0 <= value <= 1:
        raise GptossError(f"{option} {text!r} is outside 0..1", f"e.g. {option} 0.7 or {option} 70%")
    return value


def parse_efforts(text: str) -> list[str]:
    efforts = [e.strip() for e in text.split(",") if e.strip()]
    bad = [e for e in efforts if e not in EFFORTS]
    if bad or not efforts:
        raise GptossError(f"unknown --effort {bad[0] if bad else text!r}", "a comma-separated list of low, medium, high")
    return list(dict.fromkeys(efforts))


def sample_key(s: dict) -> tuple:
    return (s["suite"], s["effort"], s["id"], s["sample"])


# ---- perplexity -----------------------------------------------------------------------------


def perplexity_nll(engine, tokens: list[int], window: int, stride: int) -> tuple[float, int]:
    """(sum of negative log-likelihoods, tokens scored) of ``tokens``, in windows of ``window``
    tokens starting every ``stride`` tokens; each window is a fresh sequence and scores only the
    tokens no earlier window scored (the first token, with no context, is never scored). This is
    transformers' strided perplexity ("Perplexity of fixed-length models"); with stride =
    window/2 it is close to llama.cpp's perplexity tool, which scores each chunk's second half."""
    nll, scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + window, len(tokens))
        first = max(prev_end, begin + 1)             # first target position scored in this window
        if first < end:
            logprobs, _, _ = engine.prompt_logprobs(tokens[begin:end])   # [end - begin - 1]: of tokens begin+1..
            nll -= float(logprobs[first - 1 - begin:end - 1 - begin].double().sum())
            scored += end - first
        prev_end = end
        if end == len(tokens):
            break
    return nll, scored


def run_perplexity_file(engine, suite: Suite, text_id: str, path: Path, window: int, stride: int) -> dict:
    text = read_text(path)
    tokens = engine.tokenizer.encode_ordinary(text)
    t0 = time.perf_counter()
    nll, scored = perplexity_nll(engine, tokens, window, stride) if len(tokens) >= 2 else (0.0, 0)
    return {
        "suite": suite.name, "effort": None, "id": text_id, "sample": 0, "seed": 0,
        "prompt": text_id if suite.source == "built in" else str(path), "reasoning": "", "answer": "",
        "tool_calls": [], "raw": "", "malformed": [], "stop_reason": "", "grade": None, "nll": nll,
        "tokens": {"text": len(tokens), "scored": scored},
        "seconds": round(time.perf_counter() - t0, 4),
    }


# ---- one graded sample ----------------------------------------------------------------------


def run_sample(engine, suite: Suite, problem: Problem, effort: str, index: int, seed: int,
               temperature: float, max_tokens: int) -> dict:
    """Generate one reply through the chat path and grade it; Ctrl-C propagates (not recorded)."""
    from .chat_session import ChatSession, Settings
    from .harmony import Conversation, FunctionTool

    conv = Conversation(reasoning_effort=effort, developer_instructions=problem.developer,
                        tools=[FunctionTool.from_dict(t) for t in problem.tools], current_date=EVAL_DATE)
    session = ChatSession(engine, conv, Settings(temperature=temperature, max_tokens=max_tokens, seed=seed))
    malformed: list[str] = []

    def on_event(event):
        if isinstance(event, Malformed):
            malformed.append(event.reason)

    try:
        turn = session.respond(problem.prompt, on_event=on_event)
    except ContextFullError as e:
        return context_record(suite, problem, effort, index, seed, e.message)
    if turn.interrupted:
        raise KeyboardInterrupt
    st = turn.stats
    reply = {"answer": turn.answer, "reasoning": turn.reasoning, "tool_calls": turn.tool_calls, "raw": turn.raw,
             "malformed": malformed, "stop_reason": turn.stop_reason}
    tokens = {"prompt": st["prompt_tokens"], "reasoning": st["reasoning_tokens"],
              "answer": st["answer_tokens"], "generated": st["generated_tokens"]}
    return graded_record(suite, problem, effort, index, seed, reply, tokens, st["wall_s"])


# ---- scores, gate, report -------------------------------------------------------------------


def compute_scores(suites: list[Suite], efforts: list[str], samples: list[dict]) -> list[dict]:
    scores = []
    for suite in suites:
        mine = [s for s in samples if s["suite"] == suite.name]
        if suite.kind == "perplexity":
            if not mine:
                continue
            nll, scored = sum(s["nll"] for s in mine), sum(s["tokens"]["scored"] for s in mine)
            secs = sum(s["seconds"] for s in mine)
            scores.append({
                "suite": suite.name, "effort": None, "kind": "perplexity", "n": len(mine),
                "perplexity": math.exp(nll / scored) if scored else None, "nll": nll,
                "n_tokens": sum(s["tokens"]["text"] for s in mine), "scored_tokens": scored,
                "window": suite.window, "stride": suite.stride,
                "tokens_per_s": round(scored / secs, 2) if secs > 0 else None,
            })
            continue
        for effort in efforts:
            rows = [s for s in mine if s["effort"] == effort]
            if not rows:
                continue
            n, correct = len(rows), sum(bool(s["grade"]["correct"]) for s in rows)
            lo, hi = wilson_interval(correct, n)
            gen, secs = sum(s["tokens"]["generated"] for s in rows), sum(s["seconds"] for s in rows)
            scores.append({
                "suite": suite.name, "effort": effort, "kind": "accuracy", "n": n, "correct": correct,
                "accuracy": correct / n, "ci_low": lo, "ci_high": hi,
                "mean_reasoning_tokens": sum(s["tokens"]["reasoning"] for s in rows) / n,
                "tokens_per_s": round(gen / secs, 2) if secs > 0 else None,
            })
    return scores


def gate(scores: list[dict], fail_under: float | None, max_perplexity: float | None) -> list[str]:
    """What fell under ``--fail-under`` (accuracies) or over ``--max-perplexity``."""
    failures = []
    for s in scores:
        if s["kind"] == "accuracy" and fail_under is not None and s["accuracy"] < fail_under:
            failures.append(f"{s['suite']}/{s['effort']} {s['accuracy']:.3f} < {fail_under:g}")
        if s["kind"] == "perplexity" and max_perplexity is not None:
            if s["perplexity"] is None:
                failures.append(f"{s['suite']}: no tokens to score")
            elif not s["perplexity"] <= max_perplexity:            # NaN (a broken model) fails too
                failures.append(f"{s['suite']} perplexity {s['perplexity']:.3f} > {max_perplexity:g}")
    return failures


def write_report(path: Path, report: dict | None) -> None:
    """Atomically: a temporary file beside ``path``, then a rename over it. ``None`` only checks
    that it can be written (before the model loads, rather than after the first problem)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if report is None:
            tmp.write_text("", encoding="utf-8")
            tmp.unlink()
            return
        tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False, allow_nan=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise GptossError(f"cannot write the report {path}: {why_not_written(path, e)}", "pass another --output") from None


class Saver:
    """Writes the report as samples finish, at most once every ``every`` seconds: a whole report
    is rewritten each time, so saving after every sample made a long run quadratic (348 tiny
    samples spent 1.5 s holding the interpreter's lock in json.dumps, beside a batched engine
    that needs it). ``flush`` writes what is still unsaved (Ctrl-C, the end of the run)."""

    def __init__(self, write, every: float = 2.0):
        self.write, self.every = write, every
        self.last, self.pending = -math.inf, False

    def __call__(self) -> None:
        self.pending = True
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.write()
            self.pending, self.last = False, time.monotonic()


def load_previous(path: Path | None, settings: dict) -> dict | None:
    """An earlier report of the same settings at ``path``; None when there is none."""
    if path is None or not path.exists():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptossError(f"{path} exists but is not a gptoss eval report ({e})", "pass another --output, or delete it") from None
    if not isinstance(old, dict) or old.get("version") != REPORT_VERSION or not isinstance(old.get("settings"), dict):
        raise GptossError(f"{path} exists but is not a gptoss eval report", "pass another --output, or delete it")
    differ = [k for k in settings if old["settings"].get(k) != settings[k]]
    if differ:
        raise GptossError(f"{path} holds a report of other settings (differs in {', '.join(differ)}); not overwriting it",
                          "pass another --output, or rerun with the same settings to resume")
    return old


def check_same_runtime(path: Path, old: dict, runtime: dict) -> None:
    """Samples of another dtype or device kind would mix two different computations."""
    was = old.get("runtime") or {}
    for key in ("dtype", "device"):
        before, now = str(was.get(key, "")), str(runtime[key])
        if key == "device":
            before, now = before.split(":")[0], now.split(":")[0]
        if before != now:
            raise GptossError(f"{path} was run with {key} {before}, this run uses {now}; not mixing them",
                              f"rerun with the same --{key}, or pass another --output")


# ---- the command ----------------------------------------------------------------------------

RANDOM_HINT_TOKENS = 64  # above this, a model with random weights gets a hint about --max-tokens


def run(*, suites: list[str] | None, model: str, effort: str, limit: int | None, samples: int, seed: int,
        output: Path | None, fail_under: str | None, temperature: float, max_tokens: int, context: int,
        device: str, dtype: str, max_perplexity: float | None = None, ppl_window: int | None = None,
        ppl_stride: int | None = None, list_: bool = False, yes: bool = False, endpoint: str | None = None,
        api_key: str | None = None, served_model: str | None = None, parallel: int | None = None) -> None:
    out, err = Console(highlight=False), Console(stderr=True, highlight=False, soft_wrap=True)
    if list_:
        return list_suites(out)
    if not suites:
        raise GptossError("name at least one suite", "see gptoss eval --list")
    efforts = parse_efforts(effort)
    threshold = parse_fraction(fail_under, "--fail-under")
    for name, value, low in (("--limit", limit, 1), ("--samples", samples, 1), ("--max-tokens", max_tokens, 1),
                             ("--parallel", parallel, 1),
                             ("--ppl-window", ppl_window, 2), ("--ppl-stride", ppl_stride, 1)):
        if value is not None and value < low:
            raise GptossError(f"{name} must be at least {low}")
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise GptossError(f"--temperature must be between 0 and {MAX_TEMPERATURE:g}")
    loaded = [load_suite(arg, seed) for arg in suites]
    names = [s.name for s in loaded]
    if len(set(names)) != len(names):
        raise GptossError(f"suite {next(n for n in names if names.count(n) > 1)} is named twice")
    for suite in loaded:
        suite.problems, suite.texts = suite.problems[:limit], suite.texts[:limit]
        suite.window, suite.stride = ppl_window or suite.window, ppl_stride or suite.stride
        if suite.kind == "perplexity" and (suite.window >= context or suite.stride > suite.window):
            raise GptossError(f"perplexity window {suite.window} / stride {suite.stride} do not fit --context {context}",
                              "the window must be under --context, the stride at most the window (--ppl-window, --ppl-stride)")
    target = _endpoint_target(endpoint, api_key, served_model, loaded, err) if endpoint else None
    model = target.endpoint.model if target else model
    settings = {"model": model, "suites": list(suites), "efforts": efforts, "seed": seed, "samples": samples,
                "limit": limit, "temperature": temperature, "max_tokens": max_tokens, "context": context,
                "ppl_window": ppl_window, "ppl_stride": ppl_stride, "current_date": EVAL_DATE}
    if target:
        settings["endpoint"] = target.endpoint.url
    previous = load_previous(output, settings)
    if output is not None:
        write_report(output, None)
    done = {sample_key(s): s for s in (previous or {}).get("samples", []) if isinstance(s, dict)}

    from .loading import load_engine

    engine = target or load_engine(model, device, dtype, context, yes, err)
    runtime = engine.runtime_info()
    if runtime["random_weights"] and max_tokens > RANDOM_HINT_TOKENS:
        err.print(f"[yellow]note:[/] random weights rarely stop early: each answer runs to --max-tokens "
                  f"({max_tokens:,} tokens); -n {RANDOM_HINT_TOKENS} makes a quick trial")
    if previous is not None:
        check_same_runtime(output, previous, runtime)
    plan = _plan(loaded, efforts, samples, seed)
    if done:
        err.print(f"resuming {escape(str(output))}: {sum(k in done for k, _ in plan)} of {len(plan)} samples already there")

    def report() -> dict:
        ordered = [done[k] for k, _ in plan if k in done]
        scores = compute_scores(loaded, efforts, ordered)
        failures = gate(scores, threshold, max_perplexity) if len(ordered) == len(plan) else ["incomplete"]
        return {"version": REPORT_VERSION, "settings": settings, "runtime": runtime,
                "random_weights": bool(runtime["random_weights"]), "scores": scores, "samples": ordered,
                "gate": {"fail_under": threshold, "max_perplexity": max_perplexity,
                         "passed": not failures, "failures": failures}}

    if target:                             # an endpoint's samples go one at a time
        parallel = 1
    elif parallel is None:
        from .batch import default_parallel

        parallel = default_parallel(engine.device)
    before, t0 = set(done), time.perf_counter()
    _run_plan(engine, plan, done, temperature, max_tokens, err, Saver(lambda: output and write_report(output, report())),
              sample=target and target.run_sample, output=output, parallel=parallel)
    final = report()
    if output is not None:
        write_report(output, final)
    print_scores(out, final["scores"])
    print_throughput(err, [s for k, s in done.items() if k not in before], time.perf_counter() - t0, parallel)
    if output is not None:
        err.print(f"report: {escape(str(output))}")
    if final["gate"]["failures"]:
        f = final["gate"]["failures"]
        raise GptossError(f"{len(f)} score{'s' if len(f) > 1 else ''} failed the gate: {'; '.join(f)}")


def _plan(suites: list[Suite], efforts: list[str], samples: int, seed: int) -> list[tuple[tuple, tuple]]:
    """Every sample of the run, in report order: (key, what to run)."""
    plan = []
    for suite in suites:
        if suite.kind == "perplexity":
            plan += [((suite.name, None, tid, 0), (suite, tid, path)) for tid, path in suite.texts]
            continue
        for effort in efforts:
            for problem in suite.problems:
                for i in range(samples):
                    s = sample_seed(seed, suite.name, problem.id, i, effort)
                    plan.append(((suite.name, effort, problem.id, i), (suite, problem, effort, i, s)))
    return plan


def _endpoint_target(url: str, api_key: str | None, served_model: str | None, suites: list[Suite], err: Console):
    """``--endpoint``: graded suites only (perplexity needs log-probabilities of given text)."""
    from .endpoint import Endpoint, EvalTarget

    if any(s.kind == "perplexity" for s in suites):
        raise GptossError("perplexity suites need the model in process; they cannot run against --endpoint",
                          "drop them from the suites, or run without --endpoint")
    target = EvalTarget(Endpoint(url, api_key, served_model), EVAL_DATE)
    info = target.runtime_info()
    err.print(f"endpoint {escape(info['endpoint'])} · model {escape(info['model'])}"
              + (" · [yellow]random weights: its output is noise[/]" if info["random_weights"] else ""))
    return target


def _run_plan(engine, plan, done: dict, temperature: float, max_tokens: int, err: Console, save: Saver,
              sample=None, output: Path | None = None, parallel: int = 1) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    todo = [(k, job) for k, job in plan if k not in done]
    # graded samples N at a time through a batched engine; perplexity (and all at --parallel 1)
    # one at a time, in plan order
    together = [(k, job) for k, job in todo if job[0].kind != "perplexity"] if parallel > 1 else []
    alone = [(k, job) for k, job in todo if not together or job[0].kind == "perplexity"]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("eval", total=len(plan), completed=len(plan) - len(todo))
        try:
            for key, job in alone:
                suite = job[0]
                progress.update(task, description=f"{suite.name} · {key[1] or 'text'}")
                if suite.kind == "perplexity":
                    done[key] = run_perplexity_file(engine, suite, job[1], job[2], suite.window, suite.stride)
                else:
                    done[key] = (sample or partial(run_sample, engine))(*job, temperature=temperature, max_tokens=max_tokens)
                save()
                progress.advance(task)
            if together:
                progress.update(task, description=f"{parallel} at a time")
                _run_together(engine, together, done, parallel, temperature, max_tokens,
                              lambda: (save(), progress.advance(task)))
        except KeyboardInterrupt:
            progress.stop()
            save.flush()
            if output is not None:
                err.print(f"{len(done)} of {len(plan)} samples are saved in {escape(str(output))}; "
                          "run the same command again to resume")
            else:
                err.print(f"stopped after {len(done)} of {len(plan)} samples; nothing was saved "
                          "(with --output FILE each sample is saved, and the same command resumes)")
            raise
        except Exception:
            save.flush()                   # what finished before the failure stays in the report
            raise


def _run_together(engine, todo, done: dict, parallel: int, temperature: float, max_tokens: int, saved) -> None:
    """Graded samples ``parallel`` at a time: a thread each, each through its own view of one
    batched engine that decodes them all together. Results land in ``done`` as they finish (the
    report orders them by plan). Ctrl-C cancels every running sample; none of them is recorded."""
    import threading
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from .batch import BatchEngine, BatchView

    batch = BatchEngine(engine, parallel).start()
    local = threading.local()

    def one(job):
        if not hasattr(local, "view"):
            local.view = BatchView(batch)
        return run_sample(local.view, *job, temperature=temperature, max_tokens=max_tokens)

    pool = ThreadPoolExecutor(parallel, thread_name_prefix="gptoss-eval")
    try:
        running = {pool.submit(one, job): key for key, job in todo}
        while running:
            finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in finished:
                key = running.pop(f)
                done[key] = f.result()
                saved()
    finally:
        batch.close()                       # cancels what still runs: its samples are not kept
        pool.shutdown(wait=True, cancel_futures=True)


def print_scores(console: Console, scores: list[dict]) -> None:
    """The score table; a perplexity row shows "ppl" as its effort and its scored tokens as n."""
    table = Table(title="gptoss eval", title_justify="left", caption_justify="left",
                  caption="think: mean reasoning tokens · tok/s: per sample\nppl rows: n = tokens scored")
    for col in ("suite", "effort", "n", "score", "95% CI", "think", "tok/s"):
        table.add_column(col, justify="left" if col in ("suite", "effort") else "right", no_wrap=True)
    for s in scores:
        tps = f"{s['tokens_per_s']:.1f}" if s.get("tokens_per_s") is not None else "-"
        if s["kind"] == "perplexity":
            p = s["perplexity"]
            ppl = "-" if p is None else f"{p:.3f}" if p < 1e4 else f"{p:.3g}"
            table.add_row(s["suite"], "ppl", f"{s['scored_tokens']:,}", ppl, "", "", tps)
        else:
            table.add_row(s["suite"], s["effort"], str(s["n"]), f"{s['accuracy']:.1%}",
                          f"{100 * s['ci_low']:.1f}–{100 * s['ci_high']:.1f}%", f"{s['mean_reasoning_tokens']:.0f}", tps)
    console.print(table)


def print_throughput(console: Console, new: list[dict], seconds: float, parallel: int) -> None:
    """What this run generated over its wall time. The table's tok/s is each sample's own rate,
    which falls as more share a step; the total is what ``--parallel`` buys."""
    graded = [s for s in new if s.get("grade") is not None]
    if not graded or seconds <= 0:
        return
    gen = sum(s["tokens"]["generated"] for s in graded)
    console.print(f"this run: {len(graded)} samples, {gen:,} tokens generated in {seconds:.1f} s: "
                  f"{gen / seconds:,.1f} tok/s in all, {parallel} at a time")


def list_suites(console: Console) -> None:
    table = Table(title="eval suites (gptoss eval SUITE..., NAME=PATH, or a JSONL file)", title_justify="left")
    table.add_column("suite")
    table.add_column("grader")
    table.add_column("what")
    for name, spec in specs().items():
        table.add_row(name, spec.get("grader", "perplexity"), spec.get("description", ""))
    console.print(table)

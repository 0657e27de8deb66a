"""Statistics, output formats and the baseline comparison of ``gptoss bench``.

``bench.py`` measures and builds the JSON result (its docstring has the schema); this module
summarises figures (mean, sample standard deviation, median, the values), writes the result as a
Rich table, JSON, CSV or Markdown, and compares a result with an earlier one (``--baseline``),
figure by figure on the medians, in the direction that is better for each figure.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .errors import GptossError

FORMATS = ("table", "json", "csv", "md")


@dataclass(frozen=True)
class Figure:
    key: str             # the JSON key of the figure in each result
    label: str           # column title
    higher_is_better: bool
    digits: int          # decimals shown in tables
    compared: bool = True  # part of the --baseline check


FIGURES = (
    Figure("prefill_tok_s", "prefill tok/s", True, 1),
    Figure("ttft_ms", "TTFT ms", False, 2),
    Figure("decode_tok_s", "decode tok/s", True, 1),
    # decode_tok_s over the streams (batch 1: the same); derived, so not compared twice
    Figure("stream_tok_s", "tok/s/stream", True, 1, compared=False),
    Figure("itl_p50_ms", "ITL p50 ms", False, 2),
    Figure("itl_p90_ms", "ITL p90 ms", False, 2),
    Figure("itl_p99_ms", "ITL p99 ms", False, 2),
    Figure("peak_mem_gb", "peak mem GB", False, 3),
    # derived from decode_tok_s and a bandwidth measured in the same run: not compared twice
    Figure("decode_gbps", "decode GB/s", True, 2, compared=False),
    Figure("roofline_share", "roofline", True, 4, compared=False),
)
CONFIG_KEYS = ("prompt_len", "batch", "context_depth", "gen_tokens")
REGRESSION_EXIT = 3


class RegressionError(GptossError):
    """A figure is worse than the baseline's by more than --max-regression."""

    exit_code = REGRESSION_EXIT


# ---- statistics -----------------------------------------------------------------------------
def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) of sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    x = (len(sorted_values) - 1) * q / 100
    lo = math.floor(x)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (x - lo)


def summarize(values: list[float]) -> dict:
    """mean, sample standard deviation (0 for one value), median and the values themselves."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "median": statistics.median(values),
        "values": list(values),
    }


# ---- progress -------------------------------------------------------------------------------
class Progress:
    """A Rich progress bar over the sweep's runs, on stderr so stdout stays clean; or nothing."""

    def __init__(self, enabled: bool, total: int):
        if enabled:                            # a bar only where someone watches (not in CI logs)
            from rich.console import Console

            enabled = Console(stderr=True).is_terminal
        self.enabled = enabled
        self.total = total
        self._bar = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=Console(stderr=True), transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False

    def say(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def step(self, text: str) -> None:
        """Say what runs now; the previous run is done."""
        if self._bar is not None:
            done = self._bar.tasks[0].completed
            started = getattr(self, "_started", False)
            self._bar.update(self._task, description=text, completed=done + (1 if started else 0))
            self._started = True


# ---- output formats -------------------------------------------------------------------------
def emit(result: dict, fmt: str, out: TextIO, verbose: bool = False) -> None:
    if fmt == "json":
        out.write(json.dumps(result, indent=2) + "\n")
    elif fmt == "csv":
        out.write(to_csv(result))
    elif fmt == "md":
        out.write(to_markdown(result))
    elif verbose:
        print_table(result, out)
    else:
        print_compact(result, out)


def describe(result: dict) -> str:
    """One line saying what ran: model, weights, context, device, versions, dtype, path, graph."""
    return " | ".join(_describe_parts(result, full=True))


def _describe_parts(result: dict, full: bool) -> list[str]:
    """What ran, in three parts (model; device and versions; dtype, path, graph, bandwidth);
    ``full``: the kernels by name too (many on a GPU), else just which op path."""
    s, m = result["system"], result["model"]
    kernels = (s.get("kernels") or s.get("ops")) if full else s.get("ops")
    if isinstance(kernels, (dict, list)):
        kernels = json.dumps(kernels, separators=(",", ":"))
    weights = "RANDOM weights" if m["random_weights"] else "weights from " + str(m.get("path") or m["name"])
    name = s.get("cpu_name") or s.get("device_name") if s.get("device") == "cpu" else s.get("device_name")
    versions = ", ".join(f"{k} {s[k]}" for k in ("driver", "cuda", "torch", "triton") if s.get(k))
    threads = f", {s['cpu_threads']} threads" if s.get("device") == "cpu" and s.get("cpu_threads") else ""
    return [f"{m['name']} ({weights}), context {m['context']}",
            f"{name} [{s.get('device')}{threads}], {versions}",
            f"{s.get('dtype')}, ops {kernels}, CUDA graph {'on' if s.get('cuda_graph') else 'off'}"
            f", bandwidth {result['bandwidth_gbps']:.1f} GB/s measured ({result['bandwidth']['method']})"]


def _cell(fig: Figure, stats: dict, with_std: bool = True) -> str:
    mean, std = stats["mean"], stats["std"]
    if fig.key == "roofline_share":
        return f"{100 * mean:.2f}%" + (f" ± {100 * std:.2f}" if with_std else "")
    return f"{mean:.{fig.digits}f}" + (f" ± {std:.{fig.digits}f}" if with_std else "")


def _rows(result: dict):
    for r in result["results"]:
        yield [str(r[k]) for k in CONFIG_KEYS] + [_cell(f, r[f.key]) for f in FIGURES]


HEADERS = ["prompt", "batch", "depth", "gen"] + [f.label for f in FIGURES]


def _short(value: float, std: float | None = None) -> str:
    """A figure with the digits that matter at its size (llama-bench's t/s column: mean ± std)."""
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    text = f"{value:,.{digits}f}"
    return text if std is None else f"{text} ± {std:,.{digits}f}"


def print_compact(result: dict, out: TextIO) -> None:
    """The default table: the essentials, 80 columns wide (like llama-bench's model/test/t/s);
    --verbose, --format json/csv/md give every figure."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    rows = result["results"]
    depth = any(r["context_depth"] for r in rows)
    table = Table(box=None, pad_edge=False, header_style="bold underline")
    for h in ["prompt", "batch"] + (["depth"] if depth else []) + ["prefill tok/s", "TTFT ms", "decode tok/s", "roofline"]:
        table.add_column(h, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(str(r["prompt_len"]), str(r["batch"]), *([str(r["context_depth"])] if depth else []),
                      _short(r["prefill_tok_s"]["mean"], r["prefill_tok_s"]["std"]), _short(r["ttft_ms"]["mean"]),
                      _short(r["decode_tok_s"]["mean"], r["decode_tok_s"]["std"]),
                      f"{100 * r['roofline_share']['mean']:.1f}%")
    con = Console(file=out, highlight=False)   # a terminal's width; on a pipe, 80 columns
    for line in _describe_parts(result, full=False):
        con.print(Text(line, style="bold"), overflow="fold")
    con.print(table)
    s = result["settings"]
    con.print(Text(f"mean ± std of {s['repeat']} run(s) after {s['warmup']} warm-up run(s), {s['gen_tokens']} tokens "
                   "generated each", style="dim"), overflow="fold")
    con.print(Text("--verbose: also latency percentiles, memory, GB/s (json, csv, md: every figure)", style="dim"),
              overflow="fold")
    if result["model"]["random_weights"]:
        con.print(Text("RANDOM weights: the speed is real, the tokens are noise", style="dim"))


def print_table(result: dict, out: TextIO) -> None:
    """--verbose: every figure of every configuration (wide; not squeezed on a pipe)."""
    from rich.console import Console
    from rich.table import Table

    n = result["settings"]["repeat"]
    caption = f"mean ± std of {n} run(s) after {result['settings']['warmup']} warm-up run(s)"
    if result["model"]["random_weights"]:
        caption += "; RANDOM weights: the speed is real, the tokens are noise"
    from rich.text import Text

    table = Table(title=Text(describe(result)), caption=Text(caption), title_justify="left")
    for h in HEADERS:
        table.add_column(h, justify="right")
    for row in _rows(result):
        table.add_row(*row)
    con = Console(file=out)
    if not con.is_terminal:                # a pipe or file: do not squeeze to 80 columns
        con = Console(file=out, width=220)
    con.print(table)


def print_notes(result: dict) -> None:
    """The result's warnings, on stderr (every format also keeps them in its output)."""
    from rich.console import Console
    from rich.markup import escape

    con = Console(stderr=True, highlight=False, soft_wrap=True)
    for w in result.get("warnings", []):
        con.print(f"[yellow]note:[/] {escape(w)}")


def to_markdown(result: dict) -> str:
    n, s = result["settings"]["repeat"], result["settings"]
    notes = [f"Note: {w}." for w in result.get("warnings", []) if "random weights" not in w]
    lines = [
        f"**gptoss bench**: {describe(result)}",
        "",
        f"Mean ± standard deviation of {n} run(s) after {s['warmup']} warm-up run(s) per configuration"
        + ("; **random weights**: the speed is real, the tokens are noise." if result["model"]["random_weights"] else "."),
        "",
        "| " + " | ".join(HEADERS) + " |",
        "| " + " | ".join("---:" for _ in HEADERS) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def to_csv(result: dict) -> str:
    """One row per configuration; each figure as _mean, _std, _median; what ran in every row."""
    s, m = result["system"], result["model"]
    ops = s.get("kernels") or s.get("ops")
    ident = {"model": m["name"], "random_weights": m["random_weights"], "device": s.get("device"),
             "device_name": s.get("device_name"), "dtype": s.get("dtype"),
             "ops": json.dumps(ops) if isinstance(ops, (dict, list)) else ops, "cuda_graph": s.get("cuda_graph"),
             "bandwidth_gbps": result["bandwidth_gbps"]}
    buf = io.StringIO()
    cols = list(ident) + list(CONFIG_KEYS) + ["bytes_per_token"] + [
        f"{f.key}_{stat}" for f in FIGURES for stat in ("mean", "std", "median")]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in result["results"]:
        row = dict(ident) | {k: r[k] for k in CONFIG_KEYS} | {"bytes_per_token": r["bytes_per_token"]}
        for f in FIGURES:
            row.update({f"{f.key}_{stat}": r[f.key][stat] for stat in ("mean", "std", "median")})
        w.writerow(row)
    return buf.getvalue()


# ---- the baseline ---------------------------------------------------------------------------
def load_baseline(path) -> dict:
    """An earlier JSON result, checked enough to compare with; one-line errors otherwise."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise GptossError(f"cannot read --baseline {p}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptossError(f"--baseline {p} is not JSON ({e})", "give a file written by `gptoss bench --format json`") from None
    ok = isinstance(raw, dict) and isinstance(raw.get("results"), list) and all(
        isinstance(r, dict) and all(k in r for k in CONFIG_KEYS) for r in raw["results"])
    if not ok:
        raise GptossError(f"--baseline {p} is not a gptoss bench result (no results with "
                          f"{', '.join(CONFIG_KEYS)})", "give a file written by `gptoss bench --format json`")
    return raw


def compare(result: dict, base: dict, limit: float) -> tuple[list[dict], list[str]]:
    """Every compared figure of the configurations both hold: (rows, notes). A row is
    {config, figure, base, new, change, worse_by, regressed}; worse_by > 0 means worse."""
    def key(r):
        return tuple(r[k] for k in CONFIG_KEYS)

    old = {key(r): r for r in base["results"]}
    rows, notes = [], []
    for r in result["results"]:
        b = old.get(key(r))
        if b is None:
            notes.append(f"configuration {_config_name(r)} is not in the baseline")
            continue
        for f in FIGURES:
            if not f.compared or not isinstance(b.get(f.key), dict) or "median" not in b[f.key]:
                continue
            was, now = float(b[f.key]["median"]), float(r[f.key]["median"])
            if was <= 0:
                continue
            change = now / was - 1
            worse = -change if f.higher_is_better else change
            rows.append({"config": _config_name(r), "figure": f.key, "base": was, "new": now,
                         "change": change, "worse_by": worse, "regressed": worse > limit})
    for field in ("device_name", "dtype", "ops", "kernels", "cuda_graph"):
        a, b = result["system"].get(field), base.get("system", {}).get(field)
        if a != b:
            notes.append(f"the baseline ran with {field} {b!r}, this run with {a!r}")
    if base.get("model", {}).get("name") != result["model"]["name"]:
        notes.append(f"the baseline measured model {base.get('model', {}).get('name')!r}")
    return rows, notes


def check_baseline(result: dict, base: dict, limit: float, name: str) -> None:
    """Print the comparison on stderr; raise RegressionError when a figure regressed."""
    from rich.console import Console

    rows, notes = compare(result, base, limit)
    con = Console(stderr=True, highlight=False, soft_wrap=True)
    for n in notes:
        con.print(f"[yellow]note:[/] {n}")
    if not rows:
        raise GptossError(f"--baseline {name} has no configuration matching this run",
                          "run the same --prompt-lens, --batch, --context-depth and --gen-tokens")
    bad = [r for r in rows if r["regressed"]]
    for r in bad:
        con.print(f"[red]regression:[/] {r['config']}: {r['figure']} {r['base']:.4g} -> {r['new']:.4g} "
                  f"({100 * r['change']:+.1f}%, worse by {100 * r['worse_by']:.1f}% > {100 * limit:g}%)")
    configs = len({r["config"] for r in rows})
    if bad:
        raise RegressionError(f"{len(bad)} of {len(rows)} figures regressed by more than "
                              f"{100 * limit:g}% against {name}")
    con.print(f"no regression beyond {100 * limit:g}% against {name} "
              f"({len(rows)} figures in {configs} configurations compared on their medians)")


def _config_name(r: dict) -> str:
    return f"prompt {r['prompt_len']} batch {r['batch']} depth {r['context_depth']} gen {r['gen_tokens']}"

"""Eval suites: what to ask the model and how to grade it, read from ``evals/`` or the user's files.

A suite is a grading spec (``evals/suites.json``: kind, prompt template, grader and its options)
plus its problems, which come from one of four places:

- a data file shipped in ``evals/`` (``multiple-choice``, ``final-channel``, ``tool-calls``, and
  the ``perplexity`` sample text);
- a generator seeded by ``--seed`` alone (``arithmetic``, ``units``): the same seed gives the same
  problems, whatever else changes;
- an adapter for a public data set fetched by ``gptoss download --eval NAME`` into
  ``data_dir()/evals/NAME`` or given as a path (``aime25``, ``gpqa-diamond``);
- the user's own JSONL file, one problem a line (``{"prompt", "answer", "grader"?, "id"?}``).

On the command line a suite is ``NAME``, ``NAME=PATH`` (an adapter or ``perplexity`` over other
files) or ``PATH`` (a JSONL file of the user's). This module only reads and generates; running
the model and grading happen in ``evals.py`` and ``graders.py``.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from fractions import Fraction
from importlib.resources import files
from pathlib import Path

from .errors import GptossError
from .graders import GRADERS

DATA_PACKAGE = "gptoss_evals"      # evals/ ships as this package (pyproject: package-dir)


@dataclass
class Problem:
    """One question: the user message, the expected answer, and what the grader needs."""

    id: str
    prompt: str
    expected: object
    grader: str
    options: dict = field(default_factory=dict)   # grader options (tools, tolerances, ...)
    developer: str | None = None                  # developer instructions
    tools: list[dict] = field(default_factory=list)  # FunctionTool dicts declared to the model


@dataclass
class Suite:
    name: str
    kind: str                      # "generate" (sample and grade) | "perplexity"
    description: str
    source: str                    # where the problems came from (a file, a folder, a generator)
    problems: list[Problem] = field(default_factory=list)
    texts: list[tuple[str, Path]] = field(default_factory=list)   # perplexity: (id, file)
    window: int = 512              # perplexity: tokens per window
    stride: int = 256              # perplexity: tokens between window starts


def specs() -> dict:
    """The grading specs of ``evals/suites.json``, by suite name."""
    return json.loads(_data_file("suites.json").read_text(encoding="utf-8"))


def _data_file(name: str) -> Path:
    """A file of ``evals/``: beside this package in a source checkout (so code and data are
    always the same version, whatever else is installed), else the installed ``gptoss_evals``."""
    checkout = Path(__file__).resolve().parent.parent / "evals"
    if (checkout / "suites.json").is_file():
        return checkout / name
    try:
        return Path(str(files(DATA_PACKAGE) / name))
    except ModuleNotFoundError:
        raise GptossError("the eval data (package gptoss_evals) is not installed", "reinstall gptoss-cli") from None


def load_suite(arg: str, seed: int) -> Suite:
    """The suite a command-line argument names: ``NAME``, ``NAME=PATH`` or a JSONL ``PATH``."""
    all_specs = specs()
    name, _, path = arg.partition("=")
    if name in all_specs:
        spec = all_specs[name]
        user_path = Path(path).expanduser() if path else None
        if user_path is not None and spec.get("adapter") is None and spec["kind"] != "perplexity":
            raise GptossError(f"suite {name} takes no path", "only aime25, gpqa-diamond and perplexity read other files")
        return _build(name, spec, user_path, seed)
    if path:
        raise GptossError(f"unknown suite {name!r}", f"one of {', '.join(all_specs)} (see gptoss eval --list)")
    user_file = Path(arg).expanduser()
    if user_file.is_file():
        return _custom_suite(user_file)
    raise GptossError(
        f"unknown suite {arg!r}: not a suite name and not a file",
        f"one of {', '.join(all_specs)}, NAME=PATH, or a JSONL file (see gptoss eval --list)",
    )


def _build(name: str, spec: dict, user_path: Path | None, seed: int) -> Suite:
    suite = Suite(name, spec["kind"], spec.get("description", ""), "")
    if spec["kind"] == "perplexity":
        suite.window, suite.stride = spec.get("window", 512), spec.get("stride", 256)
        if user_path is None:
            suite.texts, suite.source = [("evals/" + spec["data"], _data_file(spec["data"]))], "built in"
        else:
            suite.texts, suite.source = _text_files(user_path), str(user_path)
        return suite
    if "generator" in spec:
        rows = GENERATORS[spec["generator"]](random.Random(f"{name}|{seed}"), spec.get("count", 50))
        suite.source = f"generated (seed {seed})"
    elif "adapter" in spec:
        folder = user_path or _default_data_dir(name)
        rows = ADAPTERS[spec["adapter"]](_adapter_files(name, folder, spec["files"]), seed)
        suite.source = str(folder)
    else:
        rows = _read_jsonl_text(_data_file(spec["data"]).read_text(encoding="utf-8"), f"evals/{spec['data']}")
        suite.source = "built in"
    suite.problems = [_problem(spec, row, f"{name}-{i:03d}") for i, row in enumerate(rows, 1)]
    return suite


def _problem(spec: dict, row: dict, default_id: str) -> Problem:
    """A data row in the spec's template, with the grader options merged (row keys win)."""
    fields = {**row}
    if "choices" in row:
        fields.update({letter: choice for letter, choice in zip("ABCDEFGH", row["choices"])})
    try:
        prompt = spec.get("template", "{prompt}").format(**fields)
    except (KeyError, IndexError) as e:
        raise GptossError(f"problem {row.get('id', default_id)} lacks the field {e} its template needs") from None
    options = {**spec.get("grader_options", {}), **row.get("grader_options", {})}
    if row.get("tools"):
        options["tools"] = row["tools"]
    if "expected_arguments" in row:
        options["expected_arguments"] = row["expected_arguments"]
    return Problem(
        id=str(row.get("id", default_id)), prompt=prompt, expected=row.get("answer"),
        grader=row.get("grader", spec["grader"]), options=options,
        developer=row.get("developer", spec.get("developer")), tools=row.get("tools", []),
    )


# ---- the user's JSONL suite ------------------------------------------------------------------


def _custom_suite(path: Path) -> Suite:
    """One problem a line: ``{"prompt": ..., "answer": ..., "grader": "exact"|"numeric"|"choice"
    (default exact), "id": ..., "choices": [...] (appended as (A) ... lines)}``."""
    rows = _read_jsonl_text(read_text(path), str(path))
    spec = {"grader": "exact"}
    problems = []
    for i, row in enumerate(rows, 1):
        if "prompt" not in row or "answer" not in row:
            raise GptossError(f"{path} line {i}: a problem needs \"prompt\" and \"answer\"")
        if row.get("grader", "exact") not in ("exact", "numeric", "choice"):
            raise GptossError(f"{path} line {i}: grader must be exact, numeric or choice")
        prompt = row["prompt"]
        if row.get("choices"):
            prompt += "\n\n" + "\n".join(f"({l}) {c}" for l, c in zip("ABCDEFGH", row["choices"]))
        problems.append(_problem(spec, {**row, "prompt": prompt}, f"{path.stem}-{i:03d}"))
    return Suite(path.stem, "generate", f"problems from {path.name}", str(path), problems)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GptossError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise GptossError(f"cannot read {path}: {e.strerror or e}") from None


def _read_jsonl_text(text: str, where: str) -> list[dict]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GptossError(f"{where} line {i} is not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise GptossError(f"{where} line {i} is not a JSON object")
        rows.append(row)
    if not rows:
        raise GptossError(f"{where} holds no problems")
    return rows


# ---- adapters for downloaded data sets -------------------------------------------------------


def _default_data_dir(name: str) -> Path:
    from .resolve import data_dir

    return data_dir() / "evals" / name


def _adapter_files(name: str, path: Path, expected: list[str]) -> list[Path]:
    """The data files of an adapter: ``path`` itself, or the expected files in folder ``path``."""
    if path.is_file():
        return [path]
    found = [path / f for f in expected if (path / f).is_file()]
    if not found:
        raise GptossError(
            f"no {name} data in {path} (looked for {', '.join(expected)})",
            f"run `gptoss download --eval {name}`, or pass {name}=FILE",
        )
    return found


def _aime_rows(paths: list[Path], seed: int) -> list[dict]:
    """opencompass/AIME2025 JSONL (``question``, ``answer``): an integer answer in ``\\boxed{}``."""
    rows = []
    for path in paths:
        for i, row in enumerate(_read_jsonl_text(read_text(path), str(path)), 1):
            if "question" not in row or "answer" not in row:
                raise GptossError(f"{path} line {i}: an AIME row needs question and answer")
            rows.append({"id": f"{path.stem}-{i:02d}", "question": row["question"], "answer": str(row["answer"]).strip()})
    return rows


GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


def _gpqa_rows(paths: list[Path], seed: int) -> list[dict]:
    """Idavidrein/gpqa CSV: the four answers shuffled per question by ``(seed, id)``, as
    OpenAI's gpqa_eval shuffles them, so the correct letter is not always A."""
    rows = []
    for path in paths:
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        missing = [c for c in GPQA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise GptossError(f"{path} is not a GPQA CSV (no column {missing[0]!r})")
        for i, row in enumerate(reader, 1):
            pid = (row.get("Record ID") or "").strip() or f"gpqa-{i:03d}"
            answers = [row[c].strip() for c in GPQA_COLUMNS[1:]]
            order = random.Random(f"gpqa|{seed}|{pid}").sample(range(4), 4)
            choices = [answers[j] for j in order]
            rows.append({"id": pid, "question": row["Question"].strip(), "choices": choices,
                         "answer": "ABCD"[order.index(0)]})
    return rows


ADAPTERS = {"aime25": _aime_rows, "gpqa": _gpqa_rows}


# ---- perplexity texts ------------------------------------------------------------------------


def _text_files(path: Path) -> list[tuple[str, Path]]:
    """A file, or every visible file under a folder (sorted): (id relative to ``path``, file)."""
    if path.is_file():
        return [(path.name, path)]
    if not path.is_dir():
        raise GptossError(f"{path} does not exist", "perplexity=PATH takes a text file or a folder of them")
    found = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    if not found:
        raise GptossError(f"{path} holds no files")
    return [(p.relative_to(path).as_posix(), p) for p in found]


# ---- generators: problems with known answers, from the seed alone --------------------------


def _fmt(x: Fraction) -> str:
    """A decimal without float noise: 2.54 * 3 -> '7.62'; 1/3 -> '0.333333'."""
    if x.denominator == 1:
        return str(x.numerator)
    return f"{float(x):.6f}".rstrip("0").rstrip(".")


def _arithmetic(rng: random.Random, count: int) -> list[dict]:
    """Integer arithmetic of a few kinds (sums, differences, products, mixed, exact divisions)."""
    rows = []
    for _ in range(count):
        kind = rng.choice(("add", "sub", "mul", "muladd", "parens", "div"))
        a, b, c = rng.randint(12, 999), rng.randint(12, 999), rng.randint(2, 99)
        if kind == "add":
            expr, value = f"{a} + {b} + {c}", a + b + c
        elif kind == "sub":
            expr, value = f"{a} - {b}", a - b
        elif kind == "mul":
            a, b = rng.randint(12, 99), rng.randint(12, 999)
            expr, value = f"{a} × {b}", a * b
        elif kind == "muladd":
            a, b = rng.randint(3, 99), rng.randint(12, 99)
            expr, value = f"{a} × {b} + {c}", a * b + c
        elif kind == "parens":
            a, b = rng.randint(3, 99), rng.randint(3, 99)
            expr, value = f"({a} + {b}) × {c}", (a + b) * c
        else:
            q = rng.randint(12, 999)
            expr, value = f"{q * c} ÷ {c}", q
        rows.append({"expression": expr, "answer": str(value)})
    return rows


# (from, to, factor): value_in_to = value_in_from * factor; exact decimal factors.
UNIT_FACTORS = [
    ("kilometres", "metres", "1000"), ("metres", "centimetres", "100"), ("kilograms", "grams", "1000"),
    ("hours", "minutes", "60"), ("minutes", "seconds", "60"), ("days", "hours", "24"),
    ("weeks", "days", "7"), ("litres", "millilitres", "1000"), ("inches", "centimetres", "2.54"),
    ("feet", "inches", "12"), ("miles", "kilometres", "1.609344"), ("pounds", "kilograms", "0.45359237"),
    ("metres per second", "kilometres per hour", "3.6"), ("yards", "metres", "0.9144"),
    ("tonnes", "kilograms", "1000"), ("gigabytes", "megabytes", "1000"),
]


def _units(rng: random.Random, count: int) -> list[dict]:
    """Unit conversions either way, and Celsius/Fahrenheit; answers exact, graded to 0.1%."""
    rows = []
    for _ in range(count):
        value = Fraction(rng.randint(2, 500)) if rng.random() < 0.7 else Fraction(rng.randint(11, 999), 10)
        if rng.random() < 0.1:
            if rng.random() < 0.5:
                src, dst, result = "degrees Celsius", "degrees Fahrenheit", value * Fraction(9, 5) + 32
            else:
                src, dst, result = "degrees Fahrenheit", "degrees Celsius", (value - 32) * Fraction(5, 9)
        else:
            src, dst, factor = rng.choice(UNIT_FACTORS)
            factor = Fraction(factor)
            if rng.random() < 0.5:
                src, dst, factor = dst, src, 1 / factor
            result = value * factor
        rows.append({"value": _fmt(value), "from": src, "to": dst, "answer": _fmt(result)})
    return rows


GENERATORS = {"arithmetic": _arithmetic, "units": _units}


def check_specs() -> None:
    """Every spec names a known grader, generator or adapter (a test runs this)."""
    for name, spec in specs().items():
        if spec["kind"] == "perplexity":
            continue
        assert spec["grader"] in GRADERS, f"{name}: unknown grader {spec['grader']}"
        assert spec.get("generator", "arithmetic") in GENERATORS, name
        assert spec.get("adapter", "aime25") in ADAPTERS, name

"""``gptoss eval`` end to end on the tiny random checkpoint, and its pieces without a model.

The model is noise, so scores sit near zero; what is checked is the machinery: every built-in
suite runs, the report validates against ``REPORT_SCHEMA``, an interrupted run resumes to exactly
the report of an uninterrupted one, a report of other settings is left alone, ``--fail-under``
and ``--max-perplexity`` set the exit code, and the perplexity figure equals transformers'.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from gptoss_cli import evals
from gptoss_cli.cli import app
from gptoss_cli.errors import GptossError
from gptoss_cli.evals import REPORT_SCHEMA, compute_scores, gate, parse_fraction, sample_seed, wilson_interval
from gptoss_cli.suites import load_suite

BUILT_IN = ["arithmetic", "units", "multiple-choice", "final-channel", "tool-calls", "perplexity"]
FAST = ["--device", "cpu", "--dtype", "float32", "--context", "256", "--max-tokens", "3",
        "--limit", "1", "--effort", "low,high", "--seed", "7", "--ppl-window", "128", "--ppl-stride", "128"]
TIMING = ("seconds", "tokens_per_s")


def invoke(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def without_timing(value):
    """The report minus wall-clock figures, which are the only thing allowed to differ."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


@pytest.fixture(scope="module")
def full_run(tiny_full, tmp_path_factory):
    """Every built-in suite at two efforts, one problem each: (args, report path, result)."""
    out = tmp_path_factory.mktemp("eval") / "report.json"
    args = [*BUILT_IN, "--model", tiny_full, *FAST]
    result = invoke(*args, "--output", out)
    return args, out, result


# ---- end to end ------------------------------------------------------------------------------


def test_every_builtin_suite_runs(full_run):
    _, out, result = full_run
    assert result.exit_code == 0, result.output
    assert "random weights" in result.output                         # the warning line
    report = json.loads(out.read_text())
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["random_weights"] is True
    assert report["settings"]["efforts"] == ["low", "high"] and report["settings"]["seed"] == 7
    got = {(s["suite"], s["effort"]) for s in report["scores"]}
    graded = [s for s in BUILT_IN if s != "perplexity"]
    assert got == {(s, e) for s in graded for e in ("low", "high")} | {("perplexity", None)}
    assert len(report["samples"]) == len(graded) * 2 + 1
    for sample in report["samples"]:
        if sample["grade"] is not None:
            assert sample["tokens"]["generated"] <= 3
            assert sample["grade"]["reason"]
    ppl = next(s for s in report["scores"] if s["kind"] == "perplexity")
    # stride = window: each window is fresh, so its first token has no context and is not scored
    assert ppl["perplexity"] > 1 and ppl["scored_tokens"] == ppl["n_tokens"] - math.ceil(ppl["n_tokens"] / 128)
    assert report["gate"] == {"fail_under": None, "max_perplexity": None, "passed": True, "failures": []}
    for name in ("arithmetic", "tool-calls", "perplexity"):                 # the score table
        assert name in result.stdout


def _ctrl_c_at_the_second_sample(monkeypatch):
    """The user's Ctrl-C, as the second sample starts."""
    real, calls = evals.run_sample, []

    def interrupt_second(*a, **kw):
        calls.append(a[2].id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(evals, "run_sample", interrupt_second)


def test_interrupted_run_keeps_finished_samples(full_run, tmp_path, monkeypatch):
    args, out, _ = full_run
    partial_path = tmp_path / "partial.json"
    _ctrl_c_at_the_second_sample(monkeypatch)
    result = invoke(*args, "--output", partial_path, "--parallel", "1")
    assert result.exit_code == 130
    assert f"1 of 11 samples are saved in {partial_path}; run the same command again to resume" in result.output
    partial = json.loads(partial_path.read_text())
    assert partial["gate"]["failures"] == ["incomplete"] and not partial["gate"]["passed"]
    full = json.loads(out.read_text())
    # a second run gives the same first sample as the first run did
    assert without_timing(partial["samples"]) == without_timing(full["samples"][:1])


def test_interrupted_run_without_output_says_nothing_was_saved(full_run, tmp_path, monkeypatch):
    """Without --output there is no file to resume from: the message must not promise one."""
    args, _, _ = full_run
    _ctrl_c_at_the_second_sample(monkeypatch)
    monkeypatch.chdir(tmp_path)
    result = invoke(*args, "--parallel", "1")
    assert result.exit_code == 130
    assert "stopped after 1 of 11 samples; nothing was saved" in result.output and "--output" in result.output
    assert "run the same command again" not in result.output
    assert list(tmp_path.iterdir()) == []                       # and indeed nothing was written


def test_random_weights_get_a_hint_about_max_tokens(tiny_full):
    """Noise rarely stops: each answer of a random model runs to --max-tokens (2048 by default)."""
    common = ["arithmetic", "--model", tiny_full, "--device", "cpu", "--limit", "1"]
    result = invoke(*common, "--max-tokens", "100")
    assert result.exit_code == 0, result.output
    assert "each answer runs to --max-tokens (100 tokens)" in result.output and "-n 64" in result.output
    quick = invoke(*common, "--max-tokens", "64")
    assert quick.exit_code == 0 and "runs to --max-tokens" not in quick.output


def test_resume_runs_only_missing_samples_and_gives_the_same_report(full_run, tmp_path):
    args, out, _ = full_run
    full = json.loads(out.read_text())
    cut = json.loads(out.read_text())
    del cut["samples"][-1], cut["samples"][6], cut["samples"][3]      # perplexity and two graded
    resumed = tmp_path / "resumed.json"
    resumed.write_text(json.dumps(cut))
    result = invoke(*args, "--output", resumed)
    assert result.exit_code == 0, result.output
    assert "8 of 11 samples already there" in result.output
    assert without_timing(json.loads(resumed.read_text())) == without_timing(full)


def test_report_of_other_settings_is_not_overwritten(full_run):
    args, out, _ = full_run
    before = out.read_bytes()
    result = invoke(*[a if a != "7" else "8" for a in args], "--output", out)    # --seed 8
    assert result.exit_code == 1
    assert "other settings (differs in seed)" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert out.read_bytes() == before


def test_report_of_another_dtype_is_not_mixed(full_run, tmp_path):
    args, out, _ = full_run
    other = tmp_path / "bf16.json"
    report = json.loads(out.read_text())
    report["runtime"]["dtype"] = "bfloat16"
    other.write_text(json.dumps(report))
    result = invoke(*args, "--output", other)
    assert result.exit_code == 1
    assert "was run with dtype bfloat16, this run uses float32" in result.output
    assert json.loads(other.read_text()) == report


@pytest.mark.parametrize("extra, code, words", [
    (["--fail-under", "0"], 0, None),
    (["--fail-under", "70%"], 1, "failed the gate: arithmetic/low 0.000 < 0.7"),
    (["--max-perplexity", "1.5"], 1, "perplexity"),
])
def test_gate_exit_codes(full_run, extra, code, words):
    args, out, _ = full_run
    result = invoke(*args, "--output", out, *extra)       # complete report: nothing is re-run
    assert result.exit_code == code, result.output
    if words:
        assert words in result.output
    report = json.loads(out.read_text())
    assert report["gate"]["passed"] is (code == 0)


def test_perplexity_equals_transformers(tiny_full, hf_oracle, tmp_path):
    """Our figure (Engine.logits, strided windows) against transformers' loss on the same
    windows and labels; windows of 40 tokens cross the tiny model's sliding window of 16."""
    from gptoss_cli.tokenizer import load_encoding

    text = tmp_path / "t.txt"
    text.write_text("The lighthouse keeper wrote in his log every evening, whether or not anything had "
                    "happened. Most entries were short: the wind from the west, a fishing boat late to "
                    "harbour, the lamp cleaned and trimmed. Over forty years the log grew to eleven volumes.")
    window, stride = 40, 16
    out = tmp_path / "ppl.json"
    result = invoke(f"perplexity={text}", "--model", tiny_full, "--device", "cpu", "--dtype", "float32",
                    "--context", "64", "--ppl-window", window, "--ppl-stride", stride, "--output", out)
    assert result.exit_code == 0, result.output
    ours = json.loads(out.read_text())["scores"][0]

    tokens = load_encoding(tiny_full).encode_ordinary(text.read_text())
    ids = torch.tensor([tokens])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):             # transformers' strided perplexity recipe
        end = min(begin + window, len(tokens))
        target_len = end - prev_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = hf_oracle(input_ids, labels=labels).loss
        n_valid = int((labels[:, 1:] != -100).sum())
        nll, count, prev_end = nll + float(loss) * n_valid, count + n_valid, end
        if end == len(tokens):
            break
    ref_ppl = math.exp(nll / count)
    assert ours["scored_tokens"] == count == len(tokens) - 1
    assert ours["n_tokens"] == len(tokens)
    assert ours["perplexity"] == pytest.approx(ref_ppl, rel=1e-4)


# ---- bad input: one line, non-zero exit, before any model is loaded --------------------------


@pytest.mark.parametrize("args, words", [
    (["arithmetic", "--fail-under", "abc"], "--fail-under 'abc' is not a number"),
    (["arithmetic", "--fail-under", "120%"], "outside 0..1"),
    (["arithmetic", "--effort", "extreme"], "unknown --effort 'extreme'"),
    (["no-such-suite"], "unknown suite 'no-such-suite'"),
    (["arithmetic=foo.jsonl"], "suite arithmetic takes no path"),
    (["arithmetic", "arithmetic"], "named twice"),
    (["perplexity", "--context", "100", "--ppl-window", "200"], "do not fit --context 100"),
    ([], "name at least one suite"),
])
def test_bad_input(args, words):
    result = invoke(*args, "--model", "/nonexistent/model")
    assert result.exit_code == 1
    assert words in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_an_output_that_cannot_be_written_is_said_before_the_model_loads(tmp_path):
    (tmp_path / "a-file").write_text("x")
    result = invoke("arithmetic", "--model", "/nonexistent/model", "--output", tmp_path / "a-file" / "r.json")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "cannot write the report" in result.output and "a-file is a file, not a folder" in result.output
    assert not list(tmp_path.glob("**/*.tmp"))


def test_list():
    result = invoke("--list")
    assert result.exit_code == 0
    for name in [*BUILT_IN, "aime25", "gpqa-diamond"]:
        assert name in result.output


# ---- suites, seeds and scores without a model -----------------------------------------------


def test_generated_suites_depend_only_on_the_seed():
    for name in ("arithmetic", "units"):
        a, b, c = load_suite(name, 1), load_suite(name, 1), load_suite(name, 2)
        assert [p.prompt for p in a.problems] == [p.prompt for p in b.problems]
        assert [p.prompt for p in a.problems] != [p.prompt for p in c.problems]
        assert len(a.problems) == 50
    for p in load_suite("arithmetic", 5).problems:
        expr = p.prompt.removeprefix("What is ").split("?")[0].replace("×", "*").replace("÷", "//")
        assert eval(expr) == int(p.expected), p.prompt       # our own generated text


def test_unit_answers():
    for p in load_suite("units", 3).problems:
        words = p.prompt.removeprefix("Convert ").split(" to ")
        value, unit = words[0].split(" ", 1)
        if unit == "degrees Celsius":
            assert float(p.expected) == pytest.approx(float(value) * 9 / 5 + 32, rel=1e-6)
        if unit == "kilometres" and words[1].startswith("metres"):
            assert float(p.expected) == pytest.approx(float(value) * 1000)


def test_builtin_data_is_sound():
    from gptoss_cli.suites import check_specs

    check_specs()
    mc = load_suite("multiple-choice", 0).problems
    assert len(mc) >= 40 and {p.expected for p in mc} == set("ABCD")
    assert all("(D)" in p.prompt for p in mc)
    jsonschema = pytest.importorskip("jsonschema")
    for p in load_suite("tool-calls", 0).problems:
        tool = next(t for t in p.tools if t["name"] == p.expected)
        jsonschema.Draft202012Validator.check_schema(tool["parameters"])
        # the expected arguments (a subset of a call's) satisfy the schema's property types
        partial = {k: v for k, v in tool["parameters"].items() if k != "required"}
        jsonschema.validate(p.options["expected_arguments"], partial)


def test_adapters(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_HOME", str(tmp_path / "home"))
    with pytest.raises(GptossError, match="gptoss download --eval aime25"):
        load_suite("aime25", 0)
    folder = tmp_path / "home" / "evals" / "aime25"
    folder.mkdir(parents=True)
    (folder / "aime2025-I.jsonl").write_text('{"question": "Find 1+1.", "answer": "2"}\n{"question": "Q2", "answer": 70}\n')
    (folder / "aime2025-II.jsonl").write_text('{"question": "Q3", "answer": "5"}\n')
    suite = load_suite("aime25", 0)
    assert [p.id for p in suite.problems] == ["aime2025-I-01", "aime2025-I-02", "aime2025-II-01"]
    assert suite.problems[0].prompt.startswith("Find 1+1.\nPlease reason step by step")
    assert suite.problems[1].expected == "70" and suite.problems[0].options == {"integer": True}

    csv_file = tmp_path / "gpqa.csv"
    csv_file.write_text('Record ID,Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n'
                        'rec1,"What is\nbig?",Right,W1,W2,W3\nrec2,Q2?,R2,X1,X2,X3\n')
    a, b = load_suite(f"gpqa-diamond={csv_file}", 0), load_suite(f"gpqa-diamond={csv_file}", 0)
    assert [p.prompt for p in a.problems] == [p.prompt for p in b.problems]
    p = a.problems[0]
    assert p.id == "rec1" and p.prompt.startswith("What is\nbig?")
    assert f"({p.expected}) Right" in p.prompt
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(GptossError, match="not a GPQA CSV"):
        load_suite(f"gpqa-diamond={bad}", 0)


def test_custom_jsonl_suite(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": "4", "grader": "numeric"}\n'
                    '{"id": "cap", "prompt": "Capital of Italy?", "answer": "Rome"}\n'
                    '{"prompt": "Pick", "answer": "B", "grader": "choice", "choices": ["x", "y"]}\n')
    suite = load_suite(str(path), 0)
    assert suite.name == "mine"
    assert [p.id for p in suite.problems] == ["mine-001", "cap", "mine-003"]
    assert [p.grader for p in suite.problems] == ["numeric", "exact", "choice"]
    assert suite.problems[2].prompt == "Pick\n\n(A) x\n(B) y"
    path.write_text('{"prompt": "no answer"}\n')
    with pytest.raises(GptossError, match="needs \"prompt\" and \"answer\""):
        load_suite(str(path), 0)
    path.write_text("not json\n")
    with pytest.raises(GptossError, match="line 1 is not JSON"):
        load_suite(str(path), 0)


def test_sample_seeds_and_plan():
    assert sample_seed(0, "arithmetic", "a-1", 0, "low") == sample_seed(0, "arithmetic", "a-1", 0, "low")
    seeds = {sample_seed(0, "arithmetic", "a-1", i, e) for i in range(3) for e in ("low", "high")}
    assert len(seeds) == 6
    suite = load_suite("final-channel", 0)
    suite.problems = suite.problems[:2]
    plan = evals._plan([suite], ["low", "medium"], samples=2, seed=0)
    keys = [k for k, _ in plan]
    assert len(keys) == len(set(keys)) == 8
    assert keys[0] == ("final-channel", "low", "final-001", 0) and keys[1] == ("final-channel", "low", "final-001", 1)


def test_wilson_interval():
    lo, hi = wilson_interval(0, 2)
    assert lo == 0 and hi == pytest.approx(0.6576, abs=1e-4)
    lo, hi = wilson_interval(81, 100)
    assert (lo, hi) == (pytest.approx(0.7222, abs=1e-4), pytest.approx(0.8749, abs=1e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_scores_and_gate():
    suite = load_suite("units", 0)
    rng = random.Random(0)
    samples = [{"suite": "units", "effort": "low", "id": f"u{i}", "sample": 0,
                "grade": {"correct": rng.random() < 0.5}, "tokens": {"reasoning": 10, "generated": 20},
                "seconds": 2.0} for i in range(10)]
    (score,) = compute_scores([suite], ["low"], samples)
    assert score["n"] == 10 and score["accuracy"] == score["correct"] / 10
    assert score["mean_reasoning_tokens"] == 10 and score["tokens_per_s"] == 10
    assert gate([score], 1.0, None) == [f"units/low {score['accuracy']:.3f} < 1"]
    assert gate([score], 0.0, None) == []
    assert parse_fraction("70%", "--fail-under") == pytest.approx(0.7)
    assert parse_fraction("0.25", "--fail-under") == 0.25


def test_report_saves_are_spaced_and_flushed():
    """The report is rewritten whole, so not after every sample: the first at once, then at most
    one per interval, and whatever is pending when the run stops."""
    writes = []
    save = evals.Saver(lambda: writes.append(len(writes)), every=3600)
    save.flush()
    assert writes == []                           # nothing finished yet, nothing written
    save()
    save()
    save()
    assert writes == [0]
    save.flush()
    save.flush()
    assert writes == [0, 1]
    quick = evals.Saver(lambda: writes.append(len(writes)), every=0)
    quick()
    quick()
    assert writes == [0, 1, 2, 3]

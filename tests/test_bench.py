"""``gptoss bench`` on CPU with the tiny preset: formats, the JSON schema, the baseline gate, bad
options, the bytes-per-token model, the random router, and timings cross-checked against a wall
clock. Timings on a shared 2-core machine are noisy: nothing here asserts an absolute speed."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from gptoss_cli import bench, benchstats, ops
from gptoss_cli.cli import app
from gptoss_cli.config import PRESETS
from gptoss_cli.engine import Engine, pick_dtype

FIGURE_KEYS = [f.key for f in benchstats.FIGURES]
QUICK = ["--random-weights", "tiny", "--device", "cpu", "--prompt-lens", "6", "--gen-tokens", "3",
         "--repeat", "1", "--warmup", "0"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared, oversubscribed 2-core machine two OpenMP threads wait
    on each other at every barrier and a run takes ten times as long (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def small_copy_probe(monkeypatch):
    """A 32 MiB bandwidth probe instead of 256 MiB: the tests check plumbing, not the figure."""
    monkeypatch.setattr(bench, "COPY_BYTES", {"cuda": 1 << 30, "cpu": 1 << 25})


def invoke(*args):
    return CliRunner().invoke(app, ["bench", *args])


@pytest.fixture(scope="module")
def sweep():
    """One JSON result over a small sweep: two prompt lengths, batch 1 and 2, depth 0 and 20."""
    r = invoke("--random-weights", "tiny", "--device", "cpu", "--prompt-lens", "5,12",
               "--gen-tokens", "4", "--batch", "1,2", "--context-depth", "0,20", "--repeat", "2",
               "--warmup", "1", "--format", "json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# ---- the performance model --------------------------------------------------------------------
def test_bytes_per_token_reproduces_design_figures():
    b20 = bench.decode_bytes(PRESETS["gpt-oss-20b"], 2048, torch.bfloat16)
    assert sum(b20.values()) == pytest.approx(3.76e9, rel=2e-3)       # DESIGN.md 5
    assert b20["attention"] / 24 == pytest.approx(53e6, rel=0.01)       # 53 MB/layer
    assert b20["experts"] / 24 == pytest.approx(53e6, rel=0.01)         # 4 experts, 4.25 bits
    assert b20["unembedding"] == pytest.approx(1.16e9, rel=2e-3)
    assert bench.bytes_per_token(PRESETS["gpt-oss-120b"], 2048, "bfloat16") == pytest.approx(5.08e9, rel=2e-3)


def test_bytes_per_token_scales_as_documented():
    cfg = PRESETS["gpt-oss-20b"]

    def kv(context):
        return bench.decode_bytes(cfg, context)["kv_cache"]

    full, windowed = cfg.windowed_layers.count(False), cfg.windowed_layers.count(True)
    per_pos = 2 * cfg.kv_dim * 2
    assert kv(100) == per_pos * 100 * cfg.n_layers                     # below the window: all layers
    assert kv(4096) == per_pos * (4096 * full + cfg.sliding_window * windowed)
    # fp32 doubles the dense weights, not the MXFP4 experts
    f32, b16 = bench.decode_bytes(cfg, 2048, torch.float32), bench.decode_bytes(cfg, 2048, torch.bfloat16)
    assert f32["unembedding"] == 2 * b16["unembedding"] and f32["experts"] < 1.01 * b16["experts"]
    # a batch shares the weights: fewer bytes per token, expected distinct experts u(B) <= E
    assert bench.bytes_per_token(cfg, 2048, batch=8) < bench.bytes_per_token(cfg, 2048, batch=1) / 3
    one_expert = bench.decode_bytes(cfg, 2048, batch=1)["experts"] / 4
    assert bench.decode_bytes(cfg, 2048, batch=8)["experts"] == pytest.approx(32 * (1 - (28 / 32) ** 8) * one_expert)
    assert bench.decode_bytes(cfg, 2048, batch=1000)["experts"] == pytest.approx(32 * one_expert)


@pytest.mark.parametrize("n_experts", [32, 128])                 # gpt-oss-20b's and 120b's counts
def test_random_router_spreads_tokens_over_experts(monkeypatch, n_experts):
    cfg = PRESETS["tiny"].replace(n_experts=n_experts)
    eng = Engine.random(cfg, device="cpu", dtype="float32", max_context=512)
    picked = []
    route = ops.route

    def recording_route(*args, **kw):
        weights, experts = route(*args, **kw)
        picked.append(experts.flatten())
        return weights, experts

    recording_route.reference = recording_route      # what ops.moe's reference path calls
    monkeypatch.setattr(ops, "route", recording_route)
    monkeypatch.setenv(ops.KERNELS_ENV, "0")   # the reference MoE routes each layer in one call
    tokens = torch.randint(0, cfg.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    eng.model.forward(tokens, eng.model.new_cache(1), 0)
    assert len(picked) == cfg.n_layers
    for experts in picked:
        load = torch.bincount(experts, minlength=cfg.n_experts).float()
        share = load / load.sum()
        entropy = -(share[share > 0] * share[share > 0].log()).sum().item()
        assert (load > 0).sum() >= 0.9 * cfg.n_experts            # nearly every expert is used
        assert share.max() < 4 / cfg.n_experts                       # none takes the bulk
        assert entropy > 0.9 * math.log(cfg.n_experts)


# ---- statistics and the comparison ------------------------------------------------------------
def test_summary_statistics():
    s = benchstats.summarize([1.0, 2.0, 6.0])
    assert s["mean"] == 3.0 and s["median"] == 2.0 and s["values"] == [1.0, 2.0, 6.0]
    assert s["std"] == pytest.approx(math.sqrt(7))                   # Bessel-corrected
    assert benchstats.summarize([5.0])["std"] == 0.0
    assert benchstats.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert benchstats.percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    assert benchstats.percentile([1.0, 3.0], 90) == pytest.approx(2.8)


def _scaled(result: dict, factor: float) -> dict:
    """A copy whose figures are ``factor`` times better (or worse for factor < 1) in each
    figure's own direction."""
    out = json.loads(json.dumps(result))
    for r in out["results"]:
        for f in benchstats.FIGURES:
            k = factor if f.higher_is_better else 1 / factor
            r[f.key] = {s: (v * k if s != "values" else [x * k for x in v]) for s, v in r[f.key].items()}
    return out


def test_compare_directions_and_threshold(sweep):
    for factor, regressed in ((1.04, False), (0.96, False), (1 / 0.94, True), (0.94, False)):
        # baseline = result scaled: factor > 1 makes the baseline better, so this run is worse
        rows, _ = benchstats.compare(sweep, _scaled(sweep, factor), 0.05)
        compared = [f.key for f in benchstats.FIGURES if f.compared]
        assert len(rows) == len(sweep["results"]) * len(compared)
        worse = {r["figure"] for r in rows if r["regressed"]}
        assert worse == (set(compared) if regressed else set()), factor


# ---- the command through the CLI --------------------------------------------------------------
def test_json_has_the_documented_fields(sweep):
    assert sweep["schema"] == bench.SCHEMA
    assert {"system", "model", "settings", "bandwidth_gbps", "bandwidth", "timing", "warnings",
            "results", "created"} <= set(sweep)
    sysinfo = sweep["system"]
    for key in ("device", "device_name", "driver", "torch", "triton", "dtype", "ops", "cuda_graph",
                "bench_path"):
        assert key in sysinfo, key
    auto = str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch.")   # bf16 with AVX512-BF16
    assert sysinfo["device"] == "cpu" and sysinfo["cuda_graph"] is False and sysinfo["dtype"] == auto
    model = sweep["model"]
    assert model["name"] == "tiny" and model["preset"] == "tiny" and model["random_weights"] is True
    assert model["context"] >= 12 + 20 + 4 and model["params"]["total"] > model["params"]["active_per_token"]
    assert any("random weights" in w for w in sweep["warnings"])
    assert sweep["settings"] == {"prompt_lens": [5, 12], "gen_tokens": 4, "batch": [1, 2],
                                 "context_depth": [0, 20], "repeat": 2, "warmup": 1, "seed": 0}
    assert sweep["bandwidth_gbps"] > 0
    configs = {(r["prompt_len"], r["batch"], r["context_depth"]) for r in sweep["results"]}
    assert configs == {(p, b, d) for p in (5, 12) for b in (1, 2) for d in (0, 20)}
    for r in sweep["results"]:
        assert r["gen_tokens"] == 4 and r["bytes_per_token"] > 0
        assert r["decode_context"] == [r["context_depth"] + r["prompt_len"] + 1,
                                       r["context_depth"] + r["prompt_len"] + 3]
        for key in FIGURE_KEYS:
            fig = r[key]
            assert set(fig) == {"mean", "std", "median", "values"} and len(fig["values"]) == 2
            assert all(v > 0 for v in fig["values"]), key
        assert r["itl_p50_ms"]["median"] <= r["itl_p90_ms"]["median"] <= r["itl_p99_ms"]["median"]
        assert r["memory"]["peak_rss"] > 0 and r["memory"]["rss_scope"] in ("run", "process")
        assert len(r["runs"]) == 2                                        # warm-up not counted
        for run, tps in zip(r["runs"], r["decode_tok_s"]["values"]):
            assert run["decode_steps"] == 3
            assert tps == pytest.approx(r["batch"] * 3 / run["decode_s"])
            assert run["prefill_s"] <= run["ttft_s"] and run["ttft_s"] + run["decode_s"] <= run["wall_s"]
        share = r["decode_tok_s"]["values"][0] * r["bytes_per_token"] / 1e9 / sweep["bandwidth_gbps"]
        assert r["roofline_share"]["values"][0] == pytest.approx(share)


def test_csv_parses():
    r = invoke(*QUICK, "--batch", "1,2", "--format", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [int(row["batch"]) for row in rows] == [1, 2]
    for row in rows:
        assert row["random_weights"] == "True" and row["device"] == "cpu"
        for key in FIGURE_KEYS:
            assert float(row[f"{key}_mean"]) > 0 and float(row[f"{key}_std"]) >= 0


def test_markdown_parses():
    r = invoke(*QUICK, "--prompt-lens", "4,6", "--format", "md")
    assert r.exit_code == 0, r.output
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:4] == ["prompt", "batch", "depth", "gen"] and "decode tok/s" in header
    assert set(table[1].replace("|", "").split()) == {"---:"}
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [row[0] for row in rows] == ["4", "6"] and all(len(row) == len(header) for row in rows)
    assert "random weights" in r.stdout and str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch.") in r.stdout


def test_table_is_the_default_and_output_file_gets_json(tmp_path):
    out = tmp_path / "result.json"
    r = invoke(*QUICK, "--output", str(out))
    assert r.exit_code == 0, r.output
    assert "decode tok/s" in r.stdout and "RANDOM weights" in r.stdout and "CUDA graph off" in r.stdout
    saved = json.loads(out.read_text())
    assert saved["results"][0]["prompt_len"] == 6


def _shown(text: str) -> list[str]:
    from rich.cells import cell_len

    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\]8;[^\x1b]*\x1b\\", "", text)
    return [line for line in plain.splitlines() if cell_len(line) > 80 or "…" in line]


@pytest.mark.parametrize("terminal", [True, False])
def test_the_default_table_fits_80_columns(sweep, monkeypatch, terminal):
    """llama-bench's habit: the essentials (prefill, TTFT, decode, roofline) in 80 columns, in an
    80-column terminal and through a pipe; with figures 100 times these too, no cell is cut."""
    monkeypatch.setenv("COLUMNS", "80")
    if terminal:
        monkeypatch.setenv("FORCE_COLOR", "1")
    for result in (sweep, _scaled(sweep, 100.0)):
        buf = io.StringIO()
        benchstats.emit(result, "table", buf)
        out = buf.getvalue()
        assert not _shown(out), "\n".join(_shown(out))
        for label in ("prompt", "batch", "depth", "prefill tok/s", "TTFT ms", "decode tok/s", "roofline"):
            assert label in out
        assert "--verbose" in out and "RANDOM weights" in out


def test_verbose_and_the_file_formats_keep_every_figure(sweep):
    buf = io.StringIO()
    benchstats.emit(sweep, "table", buf, verbose=True)
    for f in benchstats.FIGURES:
        assert f.label in buf.getvalue()
    r = subprocess.run([sys.executable, "-m", "gptoss_cli", "bench", *QUICK, "-v"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "ITL p99 ms" in r.stdout and "peak mem GB" in r.stdout, r.stderr


def test_model_folder_is_benchmarked_and_called_random(tiny_full):
    r = invoke("--model", str(tiny_full), "--device", "cpu", "--prompt-lens", "4", "--gen-tokens", "2",
               "--repeat", "1", "--warmup", "0", "--format", "json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["model"]["random_weights"] is True and res["model"]["preset"] == "tiny"
    assert res["model"]["path"] == str(tiny_full)


def test_baseline_passes_and_fails(tmp_path, sweep):
    quick = invoke(*QUICK, "--format", "json")
    assert quick.exit_code == 0, quick.output
    result = json.loads(quick.stdout)
    slower, faster = tmp_path / "slower.json", tmp_path / "faster.json"
    # a baseline 100 times worse cannot be beaten by noise; one 100 times better always is
    slower.write_text(json.dumps(_scaled(result, 0.01)))
    faster.write_text(json.dumps(_scaled(result, 100.0)))
    ok = invoke(*QUICK, "--format", "json", "--baseline", str(slower), "--max-regression", "5%")
    assert ok.exit_code == 0, ok.output
    assert "no regression" in ok.stderr
    json.loads(ok.stdout)                                   # stdout still holds the result
    bad = invoke(*QUICK, "--format", "json", "--baseline", str(faster), "--max-regression", "5")
    assert bad.exit_code == benchstats.REGRESSION_EXIT, bad.output
    assert "regression:" in bad.stderr and "decode_tok_s" in bad.stderr and "Traceback" not in bad.output
    assert json.loads(bad.stdout)["results"]                # the result is printed before the verdict
    # no configuration in common: an error, not a silent pass
    other = invoke(*QUICK, "--prompt-lens", "7", "--format", "json", "--baseline", str(slower))
    assert other.exit_code == 1 and "no configuration matching" in other.stderr


@pytest.mark.parametrize("args, says", [
    (["--random-weights", "gpt-oss-7b"], "unknown preset"),
    (["--random-weights", "tiny", "--model", "x"], "exclude each other"),
    ([], "nothing to benchmark"),
    (["--random-weights", "tiny", "--prompt-lens", "128,abc"], "not a whole number"),
    (["--random-weights", "tiny", "--prompt-lens", "0"], "below 1"),
    (["--random-weights", "tiny", "--prompt-lens", "200000"], "exceeds the model's context"),
    (["--random-weights", "tiny", "--repeat", "0"], "--repeat 0"),
    (["--random-weights", "tiny", "--gen-tokens", "1"], "at least 2"),
    (["--random-weights", "tiny", "--batch", "1,x"], "--batch"),
    (["--random-weights", "tiny", "--baseline", "/nonexistent/base.json"], "cannot read --baseline"),
    (["--random-weights", "tiny", "--baseline", "BAD_JSON"], "is not JSON"),
    (["--random-weights", "tiny", "--baseline", "NOT_A_RESULT"], "not a gptoss bench result"),
    (["--random-weights", "tiny", "--max-regression", "five"], "not a percentage"),
    (["--random-weights", "tiny", "--max-regression", "150%"], "not a percentage"),
    (["--model", "/nonexistent/model"], "does not exist"),
])
def test_bad_options_get_one_clear_line(args, says, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"results": [{"prompt_len": 1}]}))
    args = [str(tmp_path / "bad.json") if a == "BAD_JSON" else str(tmp_path / "other.json")
            if a == "NOT_A_RESULT" else a for a in args]
    t0 = time.perf_counter()
    r = invoke(*args)
    assert r.exit_code != 0
    assert "Traceback" not in r.output and r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], r.stderr
    assert time.perf_counter() - t0 < 10                   # refused before any model is built


@pytest.mark.parametrize("args, words", [
    (["--format", "xml"], ["'--format'", "'xml'", "'table', 'json', 'csv', 'md'"]),
    (["--dtype", "fp8"], ["'--dtype'", "'auto', 'bfloat16', 'float32'"]),
    (["--device", "tpu"], ["'--device'", "auto, cpu, cuda, cuda:N"]),
])
def test_values_outside_the_choices_are_usage_errors(args, words):
    r = invoke("--random-weights", "tiny", *args)
    assert r.exit_code == 2 and r.stdout == ""
    text = " ".join(" ".join(line.strip(" │╭╮╰╯─") for line in r.stderr.splitlines()).split())
    assert "Invalid value for" in text and all(w in text for w in words), r.stderr


# ---- honesty ------------------------------------------------------------------------------------
def test_path_reported_is_the_path_measured(monkeypatch):
    """An engine that says it has a CUDA graph and named kernels: the kernels are reported as
    they are; the graph is not claimed, since the batched loop does not use it."""
    seen = {}
    random = Engine.random.__func__

    def random_with_graph(cls, cfg, device="auto", dtype="auto", max_context=8192, seed=0, cuda_graph=False):
        seen["cuda_graph"] = cuda_graph
        return random(cls, cfg, device, dtype, max_context, seed)

    info = Engine.runtime_info
    monkeypatch.setattr(Engine, "random", classmethod(random_with_graph))
    monkeypatch.setattr(Engine, "runtime_info", lambda self: info(self) | {
        "cuda_graph": True, "kernels": {"attention": "triton_attention", "moe": "triton_moe"}})
    opts = bench.make_options(None, "tiny", "4", 2, "1", "0", 1, 0, device="cpu", graph=False)
    res = bench.execute(opts)
    assert seen == {"cuda_graph": False}                   # --no-graph reached the engine
    assert res["system"]["kernels"] == {"attention": "triton_attention", "moe": "triton_moe"}
    assert res["system"]["cuda_graph"] is False and res["system"]["engine_cuda_graph"] is True
    assert any("CUDA-graph" in w for w in res["warnings"])


def test_every_timed_interval_is_synchronised(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "_sync", lambda device: calls.append(time.perf_counter()))
    eng = Engine.random(PRESETS["tiny"], device="cpu", dtype="float32", max_context=64)
    cache = eng.model.new_cache(2)
    prompt = bench._tokens(2, 9, eng.config.vocab_size, 0, eng.device)
    t0 = time.perf_counter()
    run = bench._one_run(eng, cache, prompt, 0, 6, None)
    wall = time.perf_counter() - t0
    assert len(calls) == 2 + 5                              # around prefill, after each step
    assert run["decode_steps"] == 5 and run["ttft_s"] + run["decode_s"] <= wall
    assert run["ttft_s"] + run["decode_s"] >= 0.8 * wall    # the run is its timed phases
    assert sum(run["step_s"]) == pytest.approx(run["decode_s"])
    assert cache.length == 9 + 5


def test_figures_add_up_to_the_wall_clock():
    """The whole bench timed from outside: the measured phases fit inside the wall time and are
    a sensible share of it; load, bandwidth probe, warm-up and runs account for nearly all of it."""
    opts = bench.make_options(None, "tiny", "16", 12, "1,2", "0", 3, 1, device="cpu")
    t0 = time.perf_counter()
    res = bench.execute(opts)
    wall = time.perf_counter() - t0
    t = res["timing"]
    assert t["measured_s"] <= t["runs_s"] <= t["wall_s"] <= wall
    accounted = t["load_s"] + t["info_s"] + t["bandwidth_s"] + t["fill_s"] + t["warmup_s"] + t["runs_s"]
    assert accounted <= t["wall_s"] and accounted >= 0.8 * wall
    assert t["measured_s"] >= 0.25 * wall
    summed = sum(run["ttft_s"] + run["decode_s"] for r in res["results"] for run in r["runs"])
    assert summed == pytest.approx(t["measured_s"])
    for r in res["results"]:
        for run, tps, ttft in zip(r["runs"], r["decode_tok_s"]["values"], r["ttft_ms"]["values"]):
            assert tps == pytest.approx(r["batch"] * (12 - 1) / run["decode_s"])   # G-1 tokens/stream
            assert ttft == pytest.approx(1e3 * run["ttft_s"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_gpu_memory_and_bandwidth_come_from_the_device():
    opts = bench.make_options(None, "tiny", "16", 8, "1,2", "0,32", 2, 1, device="cuda")
    res = bench.execute(opts)
    assert res["system"]["device"].startswith("cuda") and res["system"]["driver"]
    assert res["bandwidth"]["method"] == "device-to-device copy" and res["bandwidth_gbps"] > 100
    for r in res["results"]:
        mem = r["memory"]
        assert {"peak_allocated", "peak_reserved", "device_used", "device_total"} <= set(mem)
        assert r["peak_mem_gb"]["values"][-1] == pytest.approx(mem["peak_reserved"] / 1e9)
        assert 0 < r["roofline_share"]["median"] < 1.5

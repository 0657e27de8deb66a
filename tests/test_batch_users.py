"""What runs on the batched engine: ``gptoss serve --parallel``, ``gptoss eval --parallel``,
``gptoss bench --batch``."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from conftest import start_server, stop_server
from gptoss_cli import evals
from gptoss_cli.cli import app
from gptoss_cli.engine import Engine

TIMING = ("seconds", "tokens_per_s")


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


# ---- serve -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parallel_server(tiny_hf_single):
    engine = Engine.load(tiny_hf_single, device="cpu", dtype="float32", max_context=512)
    server, uv, url = start_server(engine, max_queue=1, parallel=2)
    yield server, url
    stop_server(server, uv)


def _complete(url: str, prompt: str, n: int, **extra) -> dict:
    r = httpx.post(url + "/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": n,
                                               "temperature": 0, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_concurrent_requests_share_decode_steps_and_answer_as_alone(parallel_server, served):
    server, url = parallel_server
    prompts = ["The first of two", "A second prompt, longer than the first one is"]
    results = {}

    def ask(i):
        results[i] = _complete(url, prompts[i], 40)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    batch = server.worker.batch
    assert batch.rows_decoded / batch.rounds > 1.2                  # the two shared steps
    for i, p in enumerate(prompts):                                 # as the one-at-a-time server
        alone = _complete(served[1], p, 40)
        assert results[i]["choices"][0]["text"] == alone["choices"][0]["text"]
        assert results[i]["usage"]["completion_tokens"] == 40
    health = httpx.get(url.removesuffix("/v1") + "/health").json()
    assert health["parallel"] == 2 and health["running"] == 0


def test_queue_beyond_parallel_and_a_client_leaving_frees_its_slot(parallel_server):
    server, url = parallel_server
    worker, batch = server.worker, server.worker.batch
    body = {"model": "tiny", "prompt": "Go on and on", "max_tokens": 400, "stream": True, "temperature": 1.0}
    started = []

    def stream_then_leave(stop: threading.Event):
        with httpx.stream("POST", url + "/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and not started.count(stop):
                    started.append(stop)
                if stop.is_set():
                    return                                          # the client goes away

    stops = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=stream_then_leave, args=(s,)) for s in stops]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while len(started) < 2:
        assert time.time() < deadline
        time.sleep(0.01)
    assert batch.active == 2 and len(worker.running) == 2
    # two run, one may wait (--max-queue 1), the next is told to retry
    waiting = threading.Thread(target=lambda: _complete(url, "queued", 3))
    waiting.start()
    while worker.queue.qsize() < 1:
        assert time.time() < deadline
        time.sleep(0.01)
    r = httpx.post(url + "/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 429 and r.headers["retry-after"]
    stops[0].set()                                                  # one client leaves
    threads[0].join(30)
    waiting.join(60)                                                # its slot served the queued one
    assert not waiting.is_alive()
    stops[1].set()
    threads[1].join(30)
    while batch.active and time.time() < deadline:
        time.sleep(0.01)
    assert batch.active == 0
    outcomes = {j.outcome for j in worker.history[-3:]}
    assert "cancelled" in outcomes


# ---- eval --------------------------------------------------------------------------------------
EVAL = ["arithmetic", "units", "multiple-choice", "tool-calls", "--device", "cpu", "--dtype", "float32",
        "--context", "256", "--max-tokens", "12", "--limit", "3", "--effort", "low,high", "--seed", "7"]


@pytest.mark.parametrize("temperature", ["0", "1"])
def test_eval_parallel_gives_the_report_of_one_at_a_time(tiny_full, tmp_path, temperature):
    """The same samples and scores (at temperature 1 too: each sample keeps its own seed)."""
    reports = []
    for n in ("1", "4"):
        out = tmp_path / f"p{n}.json"
        r = CliRunner().invoke(app, ["eval", *EVAL, "--model", str(tiny_full), "--temperature", temperature,
                                     "--parallel", n, "-o", str(out)])
        assert r.exit_code == 0, r.output
        reports.append(json.loads(out.read_text()))
        gen = sum(s["tokens"]["generated"] for s in reports[-1]["samples"])
        assert f"this run: 24 samples, {gen:,} tokens generated in " in r.output and f"{n} at a time" in r.output
    one, four = reports
    assert _strip(four["samples"]) == _strip(one["samples"]) and _strip(four["scores"]) == _strip(one["scores"])
    assert len(one["samples"]) == 4 * 3 * 2
    # resumed from a full report, nothing is generated, and no throughput is claimed
    r = CliRunner().invoke(app, ["eval", *EVAL, "--model", str(tiny_full), "--temperature", temperature,
                                 "--parallel", "4", "-o", str(out)])
    assert r.exit_code == 0 and "24 of 24 samples already there" in r.output and "this run:" not in r.output


def test_eval_parallel_ctrl_c_keeps_only_finished_samples(tiny_full, tmp_path, monkeypatch):
    real, calls = evals.run_sample, []

    def interrupt_seventh(*a, **kw):
        calls.append(1)
        if len(calls) == 7:           # 4 start at once: at least 2 have finished by then
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(evals, "run_sample", interrupt_seventh)
    out = tmp_path / "partial.json"
    r = CliRunner().invoke(app, ["eval", *EVAL, "--model", str(tiny_full), "--parallel", "4", "-o", str(out)])
    assert r.exit_code == 130
    saved = json.loads(out.read_text())["samples"]
    assert f"{len(saved)} of 24 samples are saved" in r.output and 2 <= len(saved) < 24
    assert {s["stop_reason"] for s in saved} <= {"stop", "length"}   # none cut short by the Ctrl-C


# ---- bench -------------------------------------------------------------------------------------
def test_bench_batch_runs_the_batched_engine():
    r = CliRunner().invoke(app, ["bench", "--random-weights", "tiny", "--device", "cpu", "--dtype", "float32",
                                 "--prompt-lens", "10", "--gen-tokens", "9", "--batch", "1,3", "--context-depth",
                                 "0,20", "--repeat", "1", "--warmup", "1", "--format", "json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    one = [x for x in res["results"] if x["batch"] == 1]
    three = [x for x in res["results"] if x["batch"] == 3]
    assert all(x["decode_path"].startswith("BatchEngine: 3 slots") for x in three)
    assert not any(x["decode_path"].startswith("BatchEngine") for x in one)
    for x in three:
        run = x["runs"][0]
        assert run["decode_steps"] == 8                              # G-1 rounds, all 3 streams each
        assert x["decode_tok_s"]["values"][0] == pytest.approx(3 * 8 / run["decode_s"])
        assert x["stream_tok_s"]["values"][0] == pytest.approx(x["decode_tok_s"]["values"][0] / 3)
        st = x["staggered"]
        assert st["streams"] == 3 and st["total_tok_s"] > 0 and st["stream_tok_s"] > 0
        assert st["itl_p50_ms"] <= st["itl_p99_ms"] and st["ttft_ms"] > 0

"""Habits users bring from llama.cpp and ollama (issue 26): ``-t`` is threads, ``-c`` the context,
``-n`` the tokens to generate, ``--temp`` the temperature; one temperature range in chat, eval and
serve; a bad option or value is one ``error:`` line like every other error; and the small things
of the interactive chat (/help's columns, /regen with a fixed seed, a reply that fills the context,
tokens outside the reasoning and answer channels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gptoss_cli.chat import COMMANDS, Repl
from gptoss_cli.chat_session import ChatSession, Settings
from gptoss_cli.engine import Engine
from gptoss_cli.errors import GptossError
from gptoss_cli.harmony import Conversation

GPTOSS = [sys.executable, "-m", "gptoss_cli"]


def _run(tmp_path, *args, timeout=300):
    env = {**os.environ, "GPTOSS_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("GPTOSS_THREADS", None)
    return subprocess.run(GPTOSS + [str(a) for a in args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _errors(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.strip()]


# ---- short options ------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 2])
def test_t_is_threads_c_is_context_n_is_tokens(tiny_full, tmp_path, threads):
    """`gptoss chat -m M -t 4 -p hi` means 4 threads, as in llama.cpp (it was temperature 4)."""
    r = _run(tmp_path, "chat", "-m", tiny_full, "--device", "cpu", "-t", threads, "-c", 512, "-n", 3,
             "-p", "hi", "--seed", 1, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["stats"]["context_limit"] == 512 and out["stats"]["generated_tokens"] == 3
    r = _run(tmp_path, "chat", "-m", tiny_full, "--device", "cpu", "-t", threads, "-n", 2, "-p", "hi")
    assert r.returncode == 0, r.stderr
    assert f"· {threads} thread{'s' if threads > 1 else ''} ·" in r.stderr     # the loading line says it


def test_temp_is_the_temperature(tiny_full, tmp_path):
    """--temp 0 is greedy: the seed no longer matters."""
    replies = []
    for seed in (1, 2):
        r = _run(tmp_path, "chat", "-m", tiny_full, "--device", "cpu", "--temp", 0, "--seed", seed, "-n", 6,
                 "-p", "hi", "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        replies.append((out["raw"], out["reasoning"], out["answer"]))
    assert replies[0] == replies[1]


def test_bench_takes_threads(tmp_path):
    r = _run(tmp_path, "bench", "--random-weights", "tiny", "--device", "cpu", "-t", 1, "-p", 4, "-n", 2,
             "-r", 1, "--warmup", 0, "--format", "json")
    assert r.returncode == 0, r.stderr
    system = json.loads(r.stdout)["system"]
    assert system["threads"] == 1 and system["cpu_threads"] == 1


# ---- bad option values: one line ----------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["chat", "--effort", "extreme"], ["'--effort'", "'extreme'", "'low', 'medium', 'high'", "gptoss chat --help"]),
    (["chat", "--max-tokens", "many"], ["'--max-tokens'", "gptoss chat --help"]),
    (["chat", "-t", "0"], ["'--threads'", "gptoss chat --help"]),
    (["chat", "--no-such-option"], ["--no-such-option", "gptoss chat --help"]),
    (["bench", "--format", "xml"], ["'--format'", "'xml'", "gptoss bench --help"]),
    (["eval", "--device", "tpu"], ["'--device'", "auto, cpu, cuda, cuda:N", "gptoss eval --help"]),
    (["serve", "--port", "http"], ["'--port'", "gptoss serve --help"]),
    (["nonsense"], ["no such command", "gptoss --help"]),
])
def test_a_bad_option_is_one_error_line(tmp_path, args, words):
    r = _run(tmp_path, *args, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = _errors(r)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("args", [["--help"], ["doctor", "--help"]])
def test_help_into_a_closed_pipe_is_quiet(tmp_path, args):
    """`gptoss --help | head -1`: the reader is gone before the help is written; the tool ends
    (as Rich does, exit 1) without a traceback."""
    env = {**os.environ, "GPTOSS_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen(GPTOSS + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         env=env)
    p.stdout.close()                     # before the interpreter has even started
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) in (0, 1) and "Traceback" not in err, err


# ---- one temperature range ----------------------------------------------------------------------

def test_one_temperature_range_for_chat_eval_and_serve(tmp_path):
    from gptoss_cli.config import VOCAB_SIZE
    from gptoss_cli.serve_api import ApiError, chat_request

    body = {"messages": [{"role": "user", "content": "hi"}]}
    settings = Settings()
    settings.set("temperature", "2")
    assert chat_request(body | {"temperature": 2}, VOCAB_SIZE).sampling.temperature == settings.temperature == 2
    with pytest.raises(GptossError, match="between 0 and 2"):
        settings.set("temperature", "2.5")
    with pytest.raises(ApiError, match="at most 2"):
        chat_request(body | {"temperature": 2.5}, VOCAB_SIZE)
    for cmd in (["chat", "--temperature", "2.5", "-p", "hi"], ["eval", "arithmetic", "--temp", "2.5"]):
        r = _run(tmp_path, *cmd, timeout=120)
        assert r.returncode == 1 and len(_errors(r)) == 1 and "between 0 and 2" in r.stderr, r.stderr


# ---- the interactive chat's small things --------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_full):
    return Engine.load(tiny_full, device="cpu", dtype="float32")


def test_help_is_two_aligned_columns(engine, capsys):
    repl = Repl(ChatSession(engine, Conversation(), Settings()), "tiny")
    repl.command("/help")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == len(COMMANDS)
    starts = {line.index(doc) for line, (_, doc) in zip(lines, COMMANDS.values())}
    assert len(starts) == 1                                   # every description in the same column
    assert all(line.startswith(cmd) for line, cmd in zip(lines, COMMANDS))


@pytest.mark.parametrize("settings, says", [
    (dict(seed=3), "seed 3 is fixed"), (dict(temperature=0), "temperature 0 is greedy"), (dict(), None)])
def test_regen_says_when_it_will_give_the_same_answer(engine, capsys, settings, says):
    session = ChatSession(engine, Conversation(current_date="2026-01-01"), Settings(max_tokens=4, **settings))
    repl = Repl(session, "tiny")
    session.respond("hello")
    capsys.readouterr()
    repl.command("/regen")
    out = capsys.readouterr().out
    assert ("the same answer again" in out) == (says is not None) and (says is None or says in out)


def test_eval_data_offline_points_at_eval_data_not_a_model_folder(tmp_path):
    r = _run(tmp_path, "download", "--eval", "aime25", timeout=120)
    lines = _errors(r)
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "offline mode is on" in lines[0] and "NAME=PATH" in lines[0] and "--model" not in lines[0]

"""`gptoss chat`: one-shot prompts, the JSON schema, and the interactive session through a real
pseudo-terminal, on the tiny random checkpoint (its output is noise, i.e. malformed Harmony)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pexpect = pytest.importorskip("pexpect")

from gptoss_cli.chat import PROMPT_JSON_SCHEMA  # noqa: E402
from gptoss_cli.chat_session import ChatSession, Settings  # noqa: E402
from gptoss_cli.chat_view import stats_line  # noqa: E402
from gptoss_cli.engine import Engine  # noqa: E402
from gptoss_cli.harmony import Conversation  # noqa: E402

GPTOSS = [sys.executable, "-m", "gptoss_cli"]


def _env(tmp_path):
    return {**os.environ, "GPTOSS_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
            "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def _chat(tmp_path, *args, stdin=None):
    return subprocess.run(GPTOSS + ["chat", *args], capture_output=True, text=True, input=stdin,
                          env=_env(tmp_path), timeout=300)


def test_prompt_json_follows_the_schema(tiny_full, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    r = _chat(tmp_path, "--model", str(tiny_full), "--prompt", "What is 2+2?", "--json",
              "--max-tokens", "12", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1                               # one JSON object, nothing else on stdout
    out = json.loads(lines[0])
    jsonschema.validate(out, PROMPT_JSON_SCHEMA)
    assert out["random_weights"] is True and out["stats"]["generated_tokens"] == 12
    assert out["stop_reason"] == "length"
    # noise is malformed Harmony: it must come back as raw text, not vanish
    assert out["raw"] or out["answer"] or out["reasoning"]


def test_prompt_from_stdin_prints_answer_and_stats(tiny_full, tmp_path):
    r = _chat(tmp_path, "--model", str(tiny_full), "--prompt", "-", "--max-tokens", "6",
              "--temperature", "0", stdin="hi there\n")
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stderr and "ttft" in r.stderr and "decode" in r.stderr
    assert r.stdout.strip()                             # the (noise) answer went to stdout
    assert "Traceback" not in r.stderr


def test_no_cpu_compiler_is_one_warning_line(tiny_full, tmp_path):
    """Without a C++ compiler the chat still answers (the PyTorch reference) and says why in one
    warning line with what to do; no Python warning with its source line."""
    r = subprocess.run(GPTOSS + ["chat", "--model", str(tiny_full), "--device", "cpu", "--prompt", "hi",
                                 "--max-tokens", "2", "--temperature", "0"], capture_output=True, text=True,
                       env={**_env(tmp_path), "CXX": str(tmp_path / "no-such-g++"),
                            "GPTOSS_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "native CPU library" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "set CXX" in lines[0], r.stderr
    assert "RuntimeWarning" not in r.stderr and "pytorch-reference ·" in r.stderr


def test_stdin_prompt_asks_what_the_option_asks(tiny_full, tmp_path):
    """`echo TEXT | gptoss chat --prompt -` is `--prompt TEXT`: stdin's trailing newline is not sent."""
    common = ["--model", str(tiny_full), "--json", "--max-tokens", "4", "--temperature", "0"]
    piped = _chat(tmp_path, "--prompt", "-", *common, stdin="What is 2+2?\n")
    given = _chat(tmp_path, "--prompt", "What is 2+2?", *common)
    assert piped.returncode == given.returncode == 0, piped.stderr + given.stderr
    piped, given = json.loads(piped.stdout), json.loads(given.stdout)
    assert piped["prompt"] == given["prompt"] == "What is 2+2?"
    assert piped["stats"]["prompt_tokens"] == given["stats"]["prompt_tokens"]
    assert (piped["raw"], piped["answer"]) == (given["raw"], given["answer"])


@pytest.mark.parametrize("data, prompt", [
    (b"hi\n", "hi"), (b"hi\r\n\n\n", "hi"), (b"\xef\xbb\xbfhi", "hi"), (b"  two\nlines \n", "  two\nlines "),
    (b"caf\xc3\xa9\n", "café"),
])
def test_read_stdin_prompt(data, prompt, monkeypatch):
    import io

    from gptoss_cli.chat import read_stdin_prompt
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert read_stdin_prompt() == prompt


def test_stdin_that_is_not_utf8_gets_one_line(tmp_path):
    r = subprocess.run(GPTOSS + ["chat", "--model", "tiny-random", "--prompt", "-"], capture_output=True,
                       input=b"caf\xe9\n", env=_env(tmp_path), timeout=300)
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    assert b"not UTF-8" in r.stderr and len(r.stderr.decode().strip().splitlines()) == 1


@pytest.mark.parametrize("args, words", [
    (["--json"], ["--json goes with --prompt"]),
    (["--model", "/nonexistent/folder", "--prompt", "x"], ["does not exist"]),
    (["--model", "nobody/nothing-here", "--prompt", "x"], ["not on this machine", "gptoss download"]),
])
def test_bad_options_get_one_line(tmp_path, args, words):
    r = _chat(tmp_path, *args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(err) == 1 and all(w in err[0] for w in words), r.stderr


@pytest.mark.parametrize("args, words", [
    (["--effort", "extreme"], ["'--effort'", "'extreme'", "'low', 'medium', 'high'"]),
    (["--reasoning", "maybe"], ["'--reasoning'", "'show', 'hide'"]),
    (["--dtype", "int3"], ["'--dtype'", "'auto', 'bfloat16', 'float32'"]),
    (["--device", "tpu"], ["'--device'", "auto, cpu, cuda, cuda:N"]),
])
def test_a_value_outside_an_options_choices_is_a_usage_error(tmp_path, args, words):
    """Options with fixed values are Typer choices: --help lists them, a wrong one is a usage
    error (exit 2) in one line naming the option and the values it takes, before any model loads."""
    r = _chat(tmp_path, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: invalid value for"), r.stderr
    assert all(w in lines[0] for w in words), r.stderr


def test_help_lists_the_choices(tmp_path):
    r = _chat(tmp_path, "--help")
    assert r.returncode == 0
    for choices in ("low|medium|high", "show|hide", "auto|bfloat16|float32"):
        assert choices in r.stdout
    assert "model-identity line" in r.stdout      # --system replaces that line, it adds nothing


def test_broken_checkpoint_gets_one_line(tiny_hf_single, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_hf_single, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    r = _chat(tmp_path, "--model", str(bad), "--prompt", "x")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "truncated or corrupt" in r.stderr


def test_context_full_is_said_not_crashed(tiny_full, tmp_path):
    r = _chat(tmp_path, "--model", str(tiny_full), "--context", "32", "--prompt", "a long question " * 20)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "context holds 32" in r.stderr and "/reset" in r.stderr


def test_second_turn_prefills_only_what_is_new(tiny_full):
    eng = Engine.load(tiny_full, device="cpu", dtype="float32")
    s = ChatSession(eng, Conversation(current_date="2026-01-01"), Settings(temperature=0, max_tokens=20))
    first_prompt = len(s.prompt_tokens("hello"))
    s.respond("hello")
    t2 = s.respond("and again")
    assert t2.stats["reused_tokens"] >= first_prompt - 8     # the engine snapshots 8 before the end
    assert t2.stats["prefill_tokens"] < t2.stats["prompt_tokens"] - first_prompt + 48
    # and the reuse is exact: a fresh session replaying the same turns gives the same reply
    fresh = ChatSession(Engine.load(tiny_full, device="cpu", dtype="float32"),
                        Conversation(current_date="2026-01-01"), Settings(temperature=0, max_tokens=20))
    fresh.turns = s.turns[:1]
    assert fresh.respond("and again").reply == t2.reply


def test_save_load_round_trip_and_markdown(tiny_full, tmp_path):
    eng = Engine.load(tiny_full, device="cpu", dtype="float32")
    s = ChatSession(eng, Conversation(reasoning_effort="high"), Settings(temperature=0, max_tokens=10))
    s.respond("first")
    s.respond("second")
    s.save(tmp_path / "t.json")
    md = s.save(tmp_path / "t.md").read_text()
    assert "## Turn 2" in md and "second" in md
    other = ChatSession(eng, Conversation(), Settings())
    other.load(tmp_path / "t.json")
    assert other.to_dict() == s.to_dict()
    assert other.conv.reasoning_effort == "high"
    assert other.history() == s.history()


def test_bad_command_arguments_are_said(tiny_full, tmp_path):
    """/set with a word, /trim with a word, /save under a file: one clear line each."""
    from gptoss_cli.chat import Repl
    from gptoss_cli.errors import GptossError

    eng = Engine.load(tiny_full, device="cpu", dtype="float32")
    repl = Repl(ChatSession(eng, Conversation(), Settings(max_tokens=2)), str(tiny_full))
    (tmp_path / "a-file").write_text("x")
    for line, words in [("/set temperature abc", "'abc' for temperature: not a number"),
                        ("/set max_tokens 2.5", "not an integer"), ("/set top_p nan", "not a number"),
                        ("/trim two", "/trim takes a number of turns"),
                        (f"/save {tmp_path / 'a-file' / 't.json'}", "a-file is a file, not a folder")]:
        with pytest.raises(GptossError, match=words):
            repl.command(line)
    assert repl.session.settings.temperature == 1.0


def _spawn(tiny_full, tmp_path, *extra):
    child = pexpect.spawn(GPTOSS[0], GPTOSS[1:] + ["chat", "--model", str(tiny_full), "--temperature", "0",
                          "--max-tokens", "12", "--context", "4096", *extra],
                          env=_env(tmp_path), encoding="utf-8", timeout=120, dimensions=(50, 200),
                          # the terminal's own "^C" echo can land between two writes of the reply,
                          # inside a multi-byte character: a real terminal shows one odd glyph there
                          codec_errors="replace")
    child.expect(">>>")
    return child


def test_interactive_session_in_a_pty(tiny_full, tmp_path):
    child = _spawn(tiny_full, tmp_path)
    child.sendline("hello there")
    child.expect(r"\[not Harmony: ")                     # noise is malformed Harmony: shown raw, marked
    child.expect("ttft")                                # the stats line after the reply
    child.expect(">>>")
    child.sendline("/context")
    child.expect("Reasoning: medium")
    child.expect(">>>")
    child.sendline("/effort high")
    child.expect("reasoning effort: high")
    child.expect(">>>")
    child.sendline("/context")
    child.expect("Reasoning: high")                     # the rendered system message changed
    child.expect(">>>")
    child.send("\x1b[200~second\nmessage\x1b[201~")  # a bracketed paste keeps its newline
    child.sendline("")
    child.expect("ttft")
    child.expect(">>>")
    child.sendline('"""first')                           # a triple-quoted block spans lines
    child.sendline('second"""')
    child.expect("ttft")
    child.expect(">>>")
    child.sendline(f"/save {tmp_path / 'pasted.json'}")
    child.expect("saved")
    child.expect(">>>")
    for _ in range(2):
        child.sendline("/undo")
        child.expect("removed the last turn")
        child.expect(">>>")
    transcript = tmp_path / "chat.json"
    child.sendline(f"/save {transcript}")
    child.expect("saved")
    child.expect(">>>")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.expect(">>>")
    child.sendline(f"/load {transcript}")
    child.expect("loaded 1 turns")
    child.expect(">>>")
    child.sendline("/nonsense")
    child.expect("unknown command")
    child.expect(">>>")
    child.sendcontrol("d")
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    pasted = json.loads((tmp_path / "pasted.json").read_text())
    assert [t["user"] for t in pasted["turns"]] == ["hello there", "second\nmessage", "first\nsecond"]
    saved = json.loads(transcript.read_text())
    assert [t["user"] for t in saved["turns"]] == ["hello there"]
    assert saved["conversation"]["reasoning_effort"] == "high"
    assert (tmp_path / "home" / "chat_history").read_text().count("hello there") == 1


def test_ctrl_c_during_a_reply_keeps_the_session(tiny_full, tmp_path):
    child = _spawn(tiny_full, tmp_path)
    child.sendline("/set max_tokens 3000")
    child.expect("max_tokens = 3000")
    child.expect(">>>")
    child.sendline("tell me a very long story")
    child.expect_exact("\x1b[?2004l")                   # prompt-toolkit gave the terminal back
    time.sleep(2.0)                                     # the reply is streaming (3000 tokens)
    child.sendintr()
    child.expect("interrupted")
    child.expect("ttft")
    child.expect(">>>")
    child.sendline("/stats")
    child.expect("generated_tokens")
    child.expect(">>>")
    child.sendline("/set max_tokens 5")
    child.expect(">>>")
    child.sendline("still there?")                      # the session goes on after Ctrl-C
    child.expect("ttft")
    child.expect(">>>")
    child.sendintr()                                    # Ctrl-C on an empty prompt leaves
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_json_keeps_every_character_the_plain_answer_prints(tiny_full, tmp_path):
    """Noise opens messages after headers the parser cannot read: their text went to stdout but
    into no field of --json. Now raw (not well-formed), answer and other hold all of stdout."""
    from collections import Counter

    common = ["--model", str(tiny_full), "--prompt", "hi", "--max-tokens", "400", "--seed", "1", "--device", "cpu"]
    plain = _chat(tmp_path, *common)
    data = _chat(tmp_path, *common, "--json")
    assert plain.returncode == data.returncode == 0, plain.stderr + data.stderr
    out = json.loads(data.stdout)
    printed = Counter("".join(plain.stdout.split()))
    kept = Counter("".join((out["raw"] + out["answer"] + out.get("other", "")).split()))
    assert printed == kept and sum(printed.values()) > 1000
    assert "not Harmony" in plain.stderr                 # noise: the case this is about


def test_a_reply_that_fills_the_context_says_so(tiny_full, tmp_path):
    common = ["--model", str(tiny_full), "--device", "cpu", "--context", "120", "--max-tokens", "500", "--prompt", "hi",
              "--seed", "1"]
    r = _chat(tmp_path, *common)
    assert r.returncode == 0, r.stderr
    assert "context 120/120" in r.stderr and "filled the context (120 tokens)" in r.stderr
    r = _chat(tmp_path, *common, "--json")
    assert json.loads(r.stdout)["stop_reason"] == "context"


def test_tokens_outside_reasoning_and_answer_are_counted_and_shown(tiny_full):
    """Random weights write noise, i.e. text outside Harmony's channels: the stats line says how
    much, instead of "reasoning 0 · answer 0 tokens"; and every token is counted once."""
    engine = Engine.load(tiny_full, device="cpu", dtype="float32")
    session = ChatSession(engine, Conversation(current_date="2026-01-01"), Settings(max_tokens=40, seed=1))
    stats = session.respond("hello").stats
    assert stats["reasoning_tokens"] + stats["answer_tokens"] + stats["other_tokens"] == stats["generated_tokens"] == 40
    assert stats["other_tokens"] > 0
    assert f"other {stats['other_tokens']:,} tokens" in stats_line(stats)


def test_a_well_formed_reply_has_no_other_tokens(tiny_full):
    """A message's header tokens count with the message. Random weights never write Harmony, so
    the engine runs for real and its tokens are swapped for those a trained model writes."""
    text = ("<|channel|>analysis<|message|>let me think<|end|>"
            "<|start|>assistant<|channel|>final<|message|>4<|return|>")
    engine = Engine.load(tiny_full, device="cpu", dtype="float32")
    forced = engine.tokenizer.encode(text, allowed_special="all")

    class Trained:
        def __getattr__(self, name):
            return getattr(engine, name)

        def generate(self, prompt, max_new_tokens, **kw):
            for tok, _ in zip(forced, engine.generate(prompt, max_new_tokens=len(forced), **kw)):
                yield tok
            engine.last_stats.stop_reason = "stop"

    session = ChatSession(Trained(), Conversation(current_date="2026-01-01"), Settings(max_tokens=64))
    turn = session.respond("2+2?")
    assert (turn.reasoning, turn.answer, turn.raw) == ("let me think", "4", "")
    assert turn.stats["other_tokens"] == 0
    assert turn.stats["reasoning_tokens"] + turn.stats["answer_tokens"] == len(forced)
    assert "other" not in stats_line(turn.stats)

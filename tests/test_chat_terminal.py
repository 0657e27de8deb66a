"""The chat's live view in a real terminal (tmux): text with wide characters is drawn once.

The live region of a streamed answer is erased and redrawn by moving the cursor up by the number
of lines Rich rendered. Rich and the terminal count some characters' cells differently (tmux:
Devanagari and Tamil vowel signs, emoji with a skin tone), so a line Rich thought fit wrapped on
the screen, each redraw left lines behind, and one line of an answer could appear 21 times
(issue 26). Through a pipe there is no live region; these tests need a terminal, and skip
without tmux.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")

WORDS = ["漢字かな", "한국어", "हिन्दी", "தமிழ்", "ภาษาไทยน้ำ", "🙂👍🏽", "❤️", "e\u0301a\u0308", "العربية", "plain",
         "words", "here", "token"]

# Streams TEXT (argv[1]) as the final channel through the chat's ReplyView, as a reply does.
DRIVER = r"""
import sys, time
from rich.console import Console
from gptoss_cli.chat_view import ReplyView
from gptoss_cli.harmony import Message, MessageEnd, MessageStart, TextDelta
text = open(sys.argv[1], encoding="utf-8").read()
view = ReplyView(Console(highlight=False), show_reasoning=True)
view(MessageStart("assistant", "final", None, None))
for i in range(0, len(text), 7):
    view(TextDelta(text[i:i + 7], "final"))
    time.sleep(0.02)                         # the live region refreshes 10 times a second
view(MessageEnd(Message("assistant", text, "final")))
view.close()
print("END OF REPLY")
"""


class Tmux:
    """A private tmux server (its own socket) with one window of a fixed size."""

    env = {**os.environ, "PS1": "$ ", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}

    def __init__(self, tmp_path, width=80, height=30):
        self.socket = f"gptoss-test-{os.getpid()}-{tmp_path.name}"
        conf = tmp_path / "tmux.conf"
        conf.write_text("set -g history-limit 50000\n")
        self.base = ["tmux", "-L", self.socket, "-f", str(conf)]
        subprocess.run(self.base + ["new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
                                    "bash --norc --noprofile"], check=True, env=self.env)

    def type(self, text: str) -> None:
        subprocess.run(self.base + ["send-keys", "-t", "t", "-l", text], check=True)
        subprocess.run(self.base + ["send-keys", "-t", "t", "Enter"], check=True)

    def screen(self) -> str:
        """Everything the window showed, its scrollback included."""
        return subprocess.run(self.base + ["capture-pane", "-t", "t", "-p", "-S", "-50000"], check=True,
                              capture_output=True, text=True).stdout

    def wait_for(self, marker: str, timeout: float = 240) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.screen()
            if marker in text:
                return text
            time.sleep(0.5)
        raise AssertionError(f"{marker!r} never appeared; the screen:\n{self.screen()[-3000:]}")

    def close(self) -> None:
        subprocess.run(self.base + ["kill-server"], capture_output=True)


@pytest.fixture
def tmux(tmp_path):
    t = Tmux(tmp_path)
    yield t
    t.close()


def _shell(cmd: list[str]) -> str:
    return " ".join("'" + c.replace("'", "'\\''") + "'" for c in cmd)


def test_a_streamed_answer_with_wide_characters_is_drawn_once(tmux, tmp_path):
    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(120)) for _ in range(3))
    (tmp_path / "answer.txt").write_text(text, encoding="utf-8")
    (tmp_path / "driver.py").write_text(DRIVER)
    tmux.type("clear; " + _shell([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "answer.txt")]))
    screen = tmux.wait_for("END OF REPLY")
    shown = screen.split(str(tmp_path / "answer.txt"))[-1].split("END OF REPLY")[0]
    # What reached the screen is the answer, once: the same characters, whatever the line breaks.
    assert "".join(shown.split()) == "".join(text.split())


@pytest.mark.slow  # writes a random checkpoint with the real vocabulary (~7 s) and chats in tmux
def test_the_chat_does_not_repeat_lines_of_a_noisy_answer(tmux, tmp_path):
    """The issue's case: tiny-random's noise (Thai, Indic, CJK...) with --seed 1 --max-tokens 400."""
    from gptoss_cli.config import PRESETS
    from gptoss_cli.synthetic import write_checkpoint

    model = write_checkpoint(tmp_path / "tiny", PRESETS["tiny"], layout="hf", seed=0)  # tiny-random's weights
    cmd = [sys.executable, "-m", "gptoss_cli", "chat", "-m", str(model), "--device", "cpu", "--seed", "1",
           "--max-tokens", "400"]
    tmux.type(f"cd {tmp_path}; export GPTOSS_HOME={tmp_path / 'home'}; clear; " + _shell(cmd))
    tmux.wait_for(">>>", timeout=120)
    tmux.type("hello there")
    screen = tmux.wait_for("ttft")
    reply = screen.split("hello there")[-1].split("ttft")[0]
    lines = Counter(line for line in reply.splitlines() if len(line.strip()) >= 20)
    assert lines and max(lines.values()) == 1, [f"{n}x {line[:60]}" for line, n in lines.most_common(3)]


# A chat whose "model" is scripted (tests/scripted_engine.py): it calls python, then answers.
TOOL_DRIVER = r"""
import sys
sys.path.insert(0, sys.argv[2])
from scripted_engine import ScriptedEngine
from gptoss_cli.chat import Repl
from gptoss_cli.chat_session import ChatSession, Settings
from gptoss_cli.chat_tools import ToolBox
from gptoss_cli.harmony import Conversation
from gptoss_cli.tokenizer import load_encoding

import json
replies = json.load(open(sys.argv[3], encoding="utf-8"))
box = ToolBox({"python"})
session = ChatSession(ScriptedEngine(load_encoding(sys.argv[1]), replies, delay_s=0.005), Conversation(),
                      Settings(), tools=box)
try:
    Repl(session, "scripted-model").loop()
finally:
    box.close()
print("CHAT OVER")
"""


FACTORIAL = [
    "<|channel|>analysis<|message|>I will compute it.<|end|>"
    "<|start|>assistant to=python<|channel|>analysis code<|message|>import math\nprint(math.factorial(20))<|call|>",
    "<|channel|>analysis<|message|>The tool says 2432902008176640000.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>20! is **2432902008176640000**, computed in python.<|return|>",
]


def _tool_chat(tmux, tmp_path, o200k_dir, replies):
    pytest.importorskip("jupyter_client")
    (tmp_path / "driver.py").write_text(TOOL_DRIVER)
    (tmp_path / "replies.json").write_text(json.dumps(replies))
    cmd = [sys.executable, str(tmp_path / "driver.py"), str(o200k_dir), os.path.dirname(__file__),
           str(tmp_path / "replies.json")]
    tmux.type(f"export GPTOSS_HOME={tmp_path / 'home'}; clear; " + _shell(cmd))
    tmux.wait_for(">>>", timeout=120)


def test_a_python_call_is_shown_consented_run_fed_back_and_the_answer_continues(tmux, tmp_path, o200k_dir):
    _tool_chat(tmux, tmp_path, o200k_dir, FACTORIAL)
    tmux.type("what is 20 factorial?")
    screen = tmux.wait_for("[a]lways for this session")
    asked = screen.split("what is 20 factorial?")[-1]
    assert "→ python: 2 lines of code" in asked and "print(math.factorial(20))" in asked
    assert "python: isolated" in asked or "python: NOT isolated" in asked     # the isolation, said plainly
    assert "2432902008176640000" not in asked                               # not run before consent
    tmux.type("y")
    screen = tmux.wait_for("ttft")
    assert "[a]lways for this session: y" in screen                          # the question stays on screen
    after = screen.split("[a]lways for this session")[-1]
    assert "← python" in after and "2432902008176640000" in after.split("← python")[1]
    assert "20! is 2432902008176640000, computed in python." in after     # the model went on
    tmux.type("/exit")
    tmux.wait_for("CHAT OVER")


def test_ctrl_c_stops_a_running_python_call_and_the_chat_goes_on(tmux, tmp_path, o200k_dir):
    sleepy = ("<|channel|>analysis<|message|>Wait.<|end|><|start|>assistant to=python<|channel|>analysis code"
              "<|message|>import time\nprint('started', flush=True)\ntime.sleep(60)<|call|>")
    _tool_chat(tmux, tmp_path, o200k_dir, [sleepy] + FACTORIAL)
    tmux.type("sleep please")
    tmux.wait_for("[a]lways for this session")
    tmux.type("a")
    time.sleep(2)                                      # the kernel starts and the call sleeps
    subprocess.run(tmux.base + ["send-keys", "-t", "t", "C-c"], check=True)
    screen = tmux.wait_for("ttft", timeout=30)
    assert "interrupted by the user (Ctrl-C)" in screen and "the partial answer is kept" in screen
    tmux.type("what is 20 factorial?")                 # the conversation goes on; "always" holds
    screen = tmux.wait_for("computed in python.", timeout=60)
    assert screen.count("[a]lways for this session") == 1
    tmux.type("/exit")
    tmux.wait_for("CHAT OVER")

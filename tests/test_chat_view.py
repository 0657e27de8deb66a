"""How a reply is shown: each Harmony channel through ReplyView, on a terminal and on a pipe."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from gptoss_cli.chat_view import ReplyView, stats_line
from gptoss_cli.harmony import Malformed, Message, MessageEnd, MessageStart, TextDelta


def _reply(view: ReplyView, reasoning: str = "Let me add 2 and 2.", answer: str = "**4**") -> None:
    """A well-formed reply: analysis, then a tool call, then the final answer in Markdown."""
    def message(channel, text, recipient=None):
        view(MessageStart("assistant", channel, recipient, "<|constrain|>json" if recipient else None))
        for piece in text.split(" "):
            if channel == "analysis":
                view.on_token("analysis")
            view(TextDelta(piece + " ", channel))
        view(MessageEnd(Message("assistant", text, channel=channel, recipient=recipient)))

    message("analysis", reasoning)
    message("commentary", '{"x": 2}', recipient="functions.add")
    message("final", answer)
    view.close()


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=100, color_system="standard" if terminal else None), buf


@pytest.mark.parametrize("terminal", [False, True])
def test_reasoning_shown_tool_call_and_answer(terminal):
    console, buf = _console(terminal)
    _reply(ReplyView(console, show_reasoning=True))
    raw = buf.getvalue()
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)            # the text without the styling
    assert "Thinking" in out and "add 2 and 2." in out
    assert "tool call functions.add" in out and '"x": 2' in out
    if terminal:
        assert "\x1b[1m4" in raw and "**4**" not in out          # Markdown rendered: bold, no stars
    else:
        assert "\x1b" not in out and "**4**" in out           # a pipe gets the text as it came


def test_hidden_reasoning_collapses_to_one_line_with_its_token_count():
    console, buf = _console(False)
    _reply(ReplyView(console, show_reasoning=False), reasoning="one two three four five")
    out = buf.getvalue()
    assert "one two three" not in out
    assert "thought for 5 tokens" in out


def test_malformed_output_is_shown_raw_and_marked():
    console, buf = _console(False)
    answer_console, answer_buf = _console(False)
    view = ReplyView(console, answer_console=answer_console)
    view(Malformed("text outside any message", "raw words"))
    view.close()
    assert "raw words" in answer_buf.getvalue()                # where the answer goes
    assert "not Harmony: text outside any message" in buf.getvalue()


def test_invalid_tool_arguments_are_flagged():
    console, buf = _console(False)
    view = ReplyView(console)
    view(MessageStart("assistant", "commentary", "functions.f", None))
    view(TextDelta("{not json", "commentary"))
    view(MessageEnd(Message("assistant", "{not json", channel="commentary", recipient="functions.f")))
    assert "not valid JSON" in buf.getvalue()


def test_stats_line_has_every_figure():
    line = stats_line({
        "time_to_first_token_s": 0.25, "prefill_tok_s": 12000.0, "prefill_tokens": 2048,
        "reused_tokens": 100, "decode_tok_s": 612.3, "reasoning_tokens": 40, "answer_tokens": 12,
        "context_used": 2200, "context_limit": 8192, "peak_memory_bytes": 13_400_000_000,
    }, "cuda")
    for part in ("ttft 0.25s", "12,000.0 tok/s", "612.3 tok/s", "reasoning 40", "answer 12",
                 "2,200/8,192", "VRAM 13.4 GB"):
        assert part in line

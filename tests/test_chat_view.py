"""How a reply is shown: each Harmony channel through ReplyView, on a terminal and on a pipe."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from rich.markdown import Markdown

from gptoss_cli.chat_markdown import CoalescedText, MarkdownStream, sample_markdown
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
    assert "thought for 5 tokens" in out and "/reasoning show" in out
    console, buf = _console(False)
    _reply(ReplyView(console, show_reasoning=False, show_hint="--reasoning show"))  # chat --prompt
    assert "(hidden: --reasoning show)" in buf.getvalue()


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


# ---- the answer streams block by block: same output, bounded work per token ---------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\]8;[^\x1b]*\x1b\\")


def _tokens(enc, text: str) -> list[str]:
    """``text`` cut where the o200k tokenizer cuts it (each piece one token's text)."""
    return [enc.decode_single_token_bytes(t).decode() for t in enc.encode_ordinary(text)]


def _render(renderables, width: int, height: int = 1000) -> str:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=width, height=height, color_system="truecolor")
    for r in renderables:
        console.print(r)
    return re.sub(r"id=\d+;", "", buf.getvalue())  # Rich numbers each hyperlink at random


def _screen(raw: str) -> str:
    """What a terminal shows after ``raw``: enough of one for Rich's live regions (carriage
    return, erase line, cursor up, newline), styles dropped."""
    lines, row, col = [[]], 0, 0
    for m in re.finditer(r"\x1b\[(\d*)([AK])|\x1b\[[0-9;?]*[a-zA-Z]|\x1b\]8;[^\x1b]*\x1b\\|\r|\n|[^\x1b\r\n]", raw):
        piece = m.group(0)
        if m.group(2) == "A":
            row = max(0, row - int(m.group(1) or 1))
        elif m.group(2) == "K":
            lines[row] = []
        elif piece == "\r":
            col = 0
        elif piece == "\n":
            row, col = row + 1, 0
            lines += [[]] * (row + 1 - len(lines))
        elif not piece.startswith("\x1b"):
            line = lines[row] = lines[row] + [" "] * (col + 1 - len(lines[row]))
            line[col] = piece
            col += 1
    return "\n".join("".join(line).rstrip() for line in lines).rstrip("\n")


@pytest.mark.parametrize("seed", range(12))
def test_streamed_markdown_equals_rendering_the_finished_text_once(seed, o200k_encoding):
    text = sample_markdown(25, seed)
    stream = MarkdownStream()
    printed = [block for piece in _tokens(o200k_encoding, text) for block in stream.feed(piece)]
    printed.append(stream.finish())
    assert stream.text == text and len(printed) > 5  # it did print block by block
    width = 50 + 7 * seed
    assert _render(printed, width) == _render([Markdown(text)], width)


@pytest.mark.parametrize("height", [1000, 8])  # 8: blocks taller than the screen, shown cropped while open
def test_the_view_on_a_terminal_ends_showing_the_answer_rendered_once(height, o200k_encoding):
    text = sample_markdown(20, seed=5)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=70, height=height, color_system="standard")
    view = ReplyView(console)
    view(MessageStart("assistant", "final", None, None))
    for piece in _tokens(o200k_encoding, text):
        view(TextDelta(piece, "final"))
    view(MessageEnd(Message("assistant", text, channel="final")))
    view.close()
    assert _screen(buf.getvalue()) == _screen(_render([Markdown(text)], 70))


def test_text_parsed_per_token_does_not_grow_with_the_answer(o200k_encoding):
    per_token = {}
    for n_blocks in (30, 300):
        stream = MarkdownStream()
        pieces = _tokens(o200k_encoding, sample_markdown(n_blocks, seed=2))
        for piece in pieces:
            stream.feed(piece)
        per_token[n_blocks] = stream.chars_parsed / len(pieces)
    assert len(pieces) > 8000
    assert per_token[300] < 1.5 * per_token[30]   # one block's worth, not the answer's
    assert per_token[300] < 100                   # re-parsing all of it would be ~16,000


def test_a_long_code_fence_is_not_parsed_again_line_by_line(o200k_encoding):
    """Inside an open top-level fence only a closing fence line can end the block: no re-parse."""
    code = "\n".join(f"    value_{i} = compute(value_{i - 1}, {i})  # step {i}" for i in range(1500))
    text = (f"Intro.\n\n```python\n{code}\n```\nAfter the fence.\n\n~~~~\n~~~\nstill code\n~~~~\n\n"
            f"- a list\n  ```\n  fenced in an item\nlazy line\n\nEnd.")
    stream = MarkdownStream()
    pieces = _tokens(o200k_encoding, text)
    printed = [block for piece in pieces for block in stream.feed(piece)] + [stream.finish()]
    assert stream.chars_parsed < 5 * len(text)   # re-parsing the fence at each of its lines: ~1000x
    assert _render(printed, 90) == _render([Markdown(text)], 90)


def test_plain_text_is_written_in_batches():
    buf = io.StringIO()
    now = [0.0]
    stream = CoalescedText(Console(file=buf, width=80), interval=0.05, clock=lambda: now[0])
    writes = []
    buf.write = lambda s, _write=buf.write: (writes.append(s), _write(s))[1]
    for i in range(1000):
        now[0] = i * 0.001            # a token a millisecond: 20 batches a second
        stream.write(f"{i} ")
    stream.flush()
    assert buf.getvalue() == "".join(f"{i} " for i in range(1000))
    assert 15 <= len(writes) <= 25


@pytest.mark.parametrize("separate_answer_console", [False, True])
def test_a_run_of_raw_text_is_shown_as_it_came_and_marked_once(separate_answer_console):
    """Noise outside any message arrives as one Malformed event a token: one run, one marker."""
    console, buf = _console(False)
    answer_console, answer_buf = _console(False) if separate_answer_console else (console, buf)
    view = ReplyView(console, answer_console=answer_console)
    for i in range(50):
        view(Malformed("text outside a message", f"w{i} "))
    for i in range(30):
        view(Malformed("text after the stop", f"s{i} "))
    view.close()
    shown = answer_buf.getvalue().replace("  [not Harmony: text outside a message]", "")
    assert shown.startswith("".join(f"w{i} " for i in range(50)) + "\n" + "".join(f"s{i} " for i in range(30)))
    out = buf.getvalue()
    assert out.count("not Harmony: text outside a message") == 1
    assert out.count("not Harmony: text after the stop") == 1

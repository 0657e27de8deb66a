"""Streaming output for the chat view: Markdown block by block, plain text coalesced.

Re-rendering a whole answer's Markdown on every token costs time that grows with the answer (1.5 ms
a token at 1 KB, 10.6 ms at 8 KB, measured before this module), so on a fast engine the terminal,
not the model, set the pace. Here the answer is cut into CommonMark blocks as it streams: a block
is finished once the next top-level block has begun on a complete line (in CommonMark a closed
block never reopens), and a finished block is rendered once and printed for good. Only the open
block is live, so the text parsed per token is bounded by one block, not by the answer.

Printed block by block, the output equals Rich rendering the finished text at once: the cuts fall
between top-level blocks, and between two blocks Rich puts the blank line that the earlier block's
element asks for (``new_line``; none after a rule), which ``MarkdownStream`` reproduces. The one
construct this can miss is a link reference definition placed after the link that uses it.

This module knows text and Rich renderables; which channel goes where is ``chat_view``'s job.
"""

from __future__ import annotations

import re
import time

from markdown_it import MarkdownIt
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markdown import Markdown, UnknownElement
from rich.segment import ControlType, Segment

_LINE_END = re.compile(r"\r\n|\r|\n")


def _parser() -> MarkdownIt:
    return MarkdownIt().enable("strikethrough").enable("table")  # the parser Rich's Markdown uses


class MarkdownStream:
    """The answer's Markdown as it streams: ``feed`` text, get back finished blocks to print.

    ``chars_parsed`` counts the characters parsed to find block ends (the per-token work that
    must not grow with the answer); the live view parses ``open_text`` again at its refresh rate.
    """

    def __init__(self):
        self.parts: list[str] = []   # the whole text, in pieces
        self.open_text = ""          # the text after the last finished block
        self.chars_parsed = 0
        self.after: bool | None = None  # the new_line of the last finished block (FinishedBlock)
        self._md = _parser()
        self._fence: re.Pattern | None = None  # the closing line of an open top-level code fence
        self._checked = 0                      # how much of open_text the last look covered

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def feed(self, delta: str) -> list[FinishedBlock]:
        """Add ``delta``; return what it finished (printable once, in order)."""
        self.parts.append(delta)
        self.open_text += delta
        if "\n" not in delta:
            return []  # a block ends only on a complete line
        complete = self.open_text[: self.open_text.rfind("\n") + 1]
        if self._fence is not None and not self._fence.search(complete, self._checked):
            self._checked = len(complete)
            return []  # inside an open top-level fence: only a closing fence line can end it
        self.chars_parsed += len(complete)
        blocks = [t for t in self._md.parse(complete) if t.level == 0 and t.nesting != -1 and t.map]
        self._fence, self._checked = _open_fence(blocks[-1] if blocks else None, complete), len(complete)
        if len(blocks) < 2:
            return []
        # markdown-it counts lines after turning \r\n and \r into \n: count them the same way
        cut = [m.end() for m in _LINE_END.finditer(complete)][blocks[-1].map[0] - 1]
        finished, self.open_text = self.open_text[:cut], self.open_text[cut:]
        self._checked -= cut
        finished_block = FinishedBlock(finished, self.after)
        self.after = Markdown.elements.get(blocks[-2].type, UnknownElement).new_line
        return [finished_block]

    def finish(self) -> FinishedBlock:
        """The open block, now finished too."""
        rest, self.open_text = self.open_text, ""
        return FinishedBlock(rest, self.after)


def _open_fence(block, text: str) -> re.Pattern | None:
    """For an open top-level code fence, a pattern of the line that may close it (CommonMark: the
    fence's character, at least as many, up to 3 spaces before); None for any other block."""
    if block is None or block.type != "fence" or not block.markup:
        return None
    char, n = block.markup[0], len(block.markup)
    closing = re.compile(rf"^ {{0,3}}{re.escape(char)}{{{n},}}[ \t]*$", re.MULTILINE)
    lines = _LINE_END.split(text)[block.map[0]:block.map[1]]
    closed = len(lines) >= 2 and closing.match(lines[-1]) is not None
    return None if closed else re.compile(rf"(?:^|(?<=\r)) {{0,3}}{re.escape(char)}{{3,}}", re.MULTILINE)


class FinishedBlock:
    """Finished Markdown as Rich renders it after what was printed before it.

    Rich decides whether a top-level block is preceded by a blank line from the last element it
    closed before that block's end: for a container (list, quote, table) something inside it, for a
    leaf (paragraph, heading, code) the block printed before. So the text is rendered behind a
    one-line stand-in for the earlier block (a paragraph, or a rule where none follows a rule), and
    the stand-in's lines are dropped."""

    _STAND_INS = {True: ("x", 1), False: ("---", 2)}  # Markdown, lines it renders to

    def __init__(self, text: str, after: bool | None):
        self.text = text
        self.after = after  # the earlier block's new_line; None: nothing was printed before

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.after is None:
            yield Markdown(self.text)
            return
        stand_in, n_lines = self._STAND_INS[self.after]
        lines = console.render_lines(Markdown(f"{stand_in}\n\n{self.text}"), options, pad=False, new_lines=True)
        for line in lines[n_lines:]:
            yield from line


# DECAWM (VT100): the terminal's automatic wrap at the right margin, off while the live region is
# drawn and on again after it. Rich counts a character's cells with its own table; terminals count
# some differently (tmux: Devanagari and Tamil vowel signs 1 cell where Rich says 0, an emoji with
# a skin tone 2 cells more). A line Rich thinks fits would then wrap on the screen, the region
# would stand taller than Rich counts, and each redraw, moving up by Rich's count, would leave
# lines behind (issue 26: 26 lines of answer filled 96 screen lines). Without the wrap a rendered
# line is exactly one screen line, its end cut off at worst until the block is printed for good.
_NO_WRAP = Segment("\x1b[?7l", None, [(ControlType.BELL,)])
_WRAP = Segment("\x1b[?7h", None, [(ControlType.BELL,)])


class OpenBlock:
    """The live part of a streamed answer: the open block, parsed when it is drawn (at the live
    region's refresh rate), not on every token. A block taller than the terminal shows its last
    lines: a live region must fit on the screen to be erased and redrawn in place; and its lines
    are drawn without the terminal's own wrap (``_NO_WRAP``), so each takes one screen line."""

    def __init__(self, stream: MarkdownStream):
        self.stream = stream
        self._drawn: tuple[str, int, list] | None = None  # text, width, rendered lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        text = self.stream.open_text
        if self._drawn is None or self._drawn[:2] != (text, options.max_width):
            block = FinishedBlock(text, self.stream.after)
            self._drawn = (text, options.max_width, console.render_lines(block, options, pad=False))
        shown = self._drawn[2][-max(1, console.size.height - 1):]
        if not shown:
            return
        yield _NO_WRAP
        for i, line in enumerate(shown):  # no newline after the last line: the cursor stays in the region
            yield from line
            if i < len(shown) - 1:
                yield Segment.line()
        yield _WRAP


class CoalescedText:
    """Plain streamed text (reasoning, tool arguments, an answer on a pipe) written in batches:
    at most one ``console.print`` per ``interval`` seconds, flushed on ``flush``. A token's text
    waits at most ``interval`` plus the time to the next token."""

    def __init__(self, console: Console, style: str | None = None, interval: float = 0.05,
                 clock=time.monotonic):
        self.console, self.style, self.interval, self.clock = console, style, interval, clock
        self._pending: list[str] = []
        self._last = -interval

    def write(self, text: str) -> None:
        self._pending.append(text)
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
            self.flush()

    def flush(self) -> None:
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self.console.print(text, style=self.style, end="", soft_wrap=True, markup=False,
                               highlight=False)


# ---- realistic answers, for the view's test and benchmark -----------------------------------

_WORDS = ("the model reads each token once and keeps its keys and values in the cache so that a "
          "later step attends over them without recomputing anything; memory bandwidth sets the "
          "pace of decoding at batch one while prefill is bound by arithmetic").split()
_LANGS = ("python", "bash", "json", "", "rust")


def sample_markdown(n_blocks: int, seed: int = 0) -> str:
    """An answer such as gpt-oss writes: headings, paragraphs with inline styles, nested lists,
    code fences, tables, quotes and rules, most blocks apart by a blank line, some not."""
    import random

    rng = random.Random(seed)

    def words(n: int) -> str:
        out = [rng.choice(_WORDS) for _ in range(n)]
        for _ in range(n // 8):
            i = rng.randrange(n)
            out[i] = rng.choice(("**{}**", "*{}*", "`{}`", "[{}](https://example.com)", "~~{}~~")).format(out[i])
        return " ".join(out)

    def block() -> str:
        kind = rng.choices(("p", "h", "ul", "ol", "code", "table", "quote", "hr"), (30, 8, 14, 8, 12, 6, 4, 2))[0]
        if kind == "p":
            return "\n".join(words(rng.randint(6, 14)).capitalize() + "." for _ in range(rng.randint(1, 4)))
        if kind == "h":
            return "#" * rng.randint(1, 3) + " " + words(rng.randint(2, 5)).capitalize()
        if kind in ("ul", "ol"):
            items = []
            for i in range(rng.randint(2, 6)):
                marker = "-" if kind == "ul" else f"{i + 1}."
                items.append(f"{marker} {words(rng.randint(3, 12))}")
                if rng.random() < 0.25:
                    items.append(f"   - {words(rng.randint(3, 8))}")
            return ("\n\n" if rng.random() < 0.2 else "\n").join(items)
        if kind == "code":
            body = "\n".join(f"{'    ' * rng.randint(0, 2)}{rng.choice(_WORDS)}({rng.choice(_WORDS)}, {rng.randint(0, 99)})"
                             for _ in range(rng.randint(2, 12)))
            return f"```{rng.choice(_LANGS)}\n{body}\n```"
        if kind == "table":
            cols = rng.randint(2, 4)
            rows = [" | ".join(words(rng.randint(1, 3)) for _ in range(cols)) for _ in range(rng.randint(2, 6))]
            return "\n".join([f"| {rows[0]} |", "|" + "---|" * cols] + [f"| {r} |" for r in rows[1:]])
        if kind == "quote":
            return "\n".join(f"> {words(rng.randint(4, 10))}" for _ in range(rng.randint(1, 3)))
        return "---"

    return "".join(block() + rng.choice(("\n\n", "\n\n", "\n\n", "\n")) for _ in range(n_blocks)).rstrip("\n")

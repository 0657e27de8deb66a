"""How a reply looks: Harmony events streamed through Rich, channel by channel.

- analysis (reasoning): dim and labelled as it streams; when hidden, a live one-line counter that
  collapses to a summary with the token count;
- final: streamed, rendered as Markdown: each finished block is printed once, only the open block
  is live (a Rich ``Live`` region on a terminal; ``chat_markdown``);
- commentary with a recipient: a tool call, shown with its arguments; a call to a built-in tool
  is shown when complete (python's code highlighted; the browser's query, URL or pattern), then
  its result (``ToolResult``), cut to a few lines;
- citations of browser pages (``【cursor†L9-L11】``) in the answer become terminal links;
- malformed output: the raw text, marked, never swallowed.

Streamed plain text (reasoning, tool arguments, an answer on a pipe) is written in batches of at
most 20 a second, so the cost per token stays that of appending a string, whatever the engine's
pace. On a pipe (stdout not a terminal) nothing moves: no colours, no cursor tricks.

A live region is redrawn from this thread, at most ``LIVE_HZ`` times a second as tokens come, not
by Rich's refresh thread: that thread could redraw the region between a finished block's erase of
the old region and its print, and the cursor then moved by a stale height (lines lost or doubled).
"""

from __future__ import annotations

import json
import re
import time
from typing import Callable

from rich.console import Console
from rich.live import Live
from rich.syntax import Syntax
from rich.text import Text

from .chat_markdown import CoalescedText, MarkdownStream, OpenBlock
from .chat_tools import ToolCall, ToolResult
from .harmony import Malformed, Message, MessageEnd, MessageStart, TextDelta

LIVE_HZ = 10  # redraws of a live region per second, at most
RESULT_LINES = 12  # lines of a tool's result shown in the terminal (the model gets all of it)
CITATION = re.compile(r"【(\d+)†([^†】]*)(?:†[^†】]*)?】")


class CitationLinker:
    """Turns the browser citations of streamed Markdown (``【3†L9-L11】``) into Markdown links to
    the cited page, holding back a citation split across deltas until it is complete."""

    def __init__(self, url_for_cursor: Callable[[int], str | None]):
        self.url_for_cursor = url_for_cursor
        self.pending = ""

    def feed(self, text: str) -> str:
        text = self.pending + text
        cut = text.rfind("【")
        if cut >= 0 and "】" not in text[cut:] and len(text) - cut < 80:
            text, self.pending = text[:cut], text[cut:]
        else:
            self.pending = ""
        return CITATION.sub(self._link, text)

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return CITATION.sub(self._link, text)

    def _link(self, m: re.Match) -> str:
        url = self.url_for_cursor(int(m.group(1)))
        if not url:
            return m.group(0)
        from urllib.parse import urlparse

        label = (urlparse(url).netloc or url) + (f" {m.group(2)}" if m.group(2) else "")
        return f" [{label}](<{url}>)"  # <...>: a URL with spaces or brackets stays one link


class ReplyView:
    """Consumes the session's events (``__call__``) and tokens (``on_token``) for one reply."""

    def __init__(self, console: Console, show_reasoning: bool = True, answer_console: Console | None = None,
                 show_hint: str = "/reasoning show", cite: Callable[[int], str | None] | None = None):
        self.show_hint = show_hint              # how to see hidden reasoning: a command, or an option
        self.console = console                  # reasoning, labels, tool calls
        self.out = answer_console or console    # the answer (stdout in --prompt mode)
        self.show_reasoning = show_reasoning
        self.live_ok = console.is_terminal and self.out.is_terminal
        self.current: MessageStart | None = None
        self.text = ""
        self.live: Live | None = None
        self.markdown: MarkdownStream | None = None  # the answer, while it streams on a terminal
        self.stream: CoalescedText | None = None     # plain streamed text, while a message lasts
        self.raw: tuple[str, CoalescedText] | None = None  # a run of raw text: its reason, its stream
        self.hidden_tokens = 0
        self.wrote_answer = False
        self._drawn_at = 0.0                    # when the live region was last redrawn
        self.cite = cite                        # browser cursor -> URL, for citations as links
        self.linker: CitationLinker | None = None

    # ---- tokens (for the hidden-reasoning counter) ------------------------------------------
    def on_token(self, channel: str) -> None:
        if channel == "analysis" and not self.show_reasoning:
            self.hidden_tokens += 1
            if self.live is not None:
                self.live.update(self._thinking_line(), refresh=False)
                self._redraw()

    def _thinking_line(self) -> Text:
        return Text(f"thinking… {self.hidden_tokens} tokens", style="dim italic")

    # ---- events ------------------------------------------------------------------------------
    def __call__(self, event) -> None:
        if self.raw is not None and not (isinstance(event, Malformed) and event.text and event.reason == self.raw[0]):
            self._end_raw()
        if isinstance(event, MessageStart):
            self._start(event)
        elif isinstance(event, TextDelta):
            self._delta(event.text)
        elif isinstance(event, MessageEnd):
            self._end()
        elif isinstance(event, Malformed):
            self._malformed(event)
        elif isinstance(event, ToolResult):
            self._tool_result(event)

    def _kind(self) -> str:
        m = self.current
        if m is None:
            return "none"
        if m.recipient not in (None, "all") and m.role == "assistant":
            return "builtin" if m.recipient == "python" or m.recipient.startswith("browser.") else "tool"
        return "analysis" if m.channel == "analysis" else "answer"

    def _tool_result(self, event) -> None:
        self._close_live()
        text = event.result.content.rstrip("\n")
        lines = text.splitlines() or [""]
        shown = "\n".join(lines[:RESULT_LINES])
        if len(lines) > RESULT_LINES:
            shown += f"\n… {len(lines) - RESULT_LINES} more lines (the model reads them all)"
        label = f"← {event.result.name}" + ("" if event.ran else " (not run)")
        self.console.print(Text(label, style="bold green" if event.ran else "bold yellow"))
        self.console.print(Text(shown, style="dim"), soft_wrap=True)

    def _start(self, m: MessageStart) -> None:
        self._close_live()
        self.current, self.text = m, ""
        kind = self._kind()
        if kind == "analysis":
            if self.show_reasoning:
                self.console.print(Text("Thinking", style="bold dim"))
                self.stream = CoalescedText(self.console, "dim")
            elif self.live_ok:
                self.live = Live(self._thinking_line(), console=self.console, transient=True,
                                 auto_refresh=False)
                self.live.start()
        elif kind == "tool":
            label = f"→ tool call {m.recipient}" + (f" ({m.content_type})" if m.content_type else "")
            self.console.print(Text(label, style="bold cyan"))
            self.stream = CoalescedText(self.console, "cyan")
        elif kind == "builtin":
            pass  # shown whole when complete (_end): highlighted code, or the query / URL
        elif kind == "answer" and self.live_ok:
            self.markdown = MarkdownStream()
            self.linker = CitationLinker(self.cite) if self.cite is not None else None
            self.live = Live(OpenBlock(self.markdown), console=self.out, auto_refresh=False,
                             transient=True)
            self.live.start()
        else:  # the answer on a pipe, or text the parser could not place: as it comes
            self.stream = CoalescedText(self.out if kind == "answer" else self.console)

    def _delta(self, text: str) -> None:
        kind = self._kind()
        if kind in ("tool", "builtin"):
            self.text += text  # kept to check the arguments; an answer's text is not copied per token
        self.wrote_answer |= kind == "answer"
        if self.markdown is not None and self.linker is not None:
            text = self.linker.feed(text)
        if self.markdown is not None:
            for block in self.markdown.feed(text):
                self.out.print(block)
            self._redraw()
        elif self.stream is not None:
            self.stream.write(text)

    def _end(self) -> None:
        kind = self._kind()
        self._flush()
        if kind == "analysis":
            if self.show_reasoning:
                self.console.print()
            else:
                self._close_live()
                self.console.print(Text(f"▸ thought for {self.hidden_tokens} tokens (hidden: {self.show_hint})", style="dim"))
        elif kind == "tool":
            self.console.print()
            try:
                json.loads(self.text)
            except ValueError:
                self.console.print(Text("  (arguments are not valid JSON)", style="yellow"))
        elif kind == "builtin":
            self._show_call()
        elif kind == "answer" and self.markdown is None:
            self.out.print()
        self.current, self.text = None, ""

    def _show_call(self) -> None:
        m = self.current
        call = ToolCall(Message("assistant", self.text, m.channel, m.recipient, m.content_type))
        self.console.print(Text(f"→ {call.summary()}", style="bold cyan"), soft_wrap=True)
        if call.tool == "python":
            self.console.print(Syntax(self.text.strip("\n"), "python", theme="ansi_dark",
                                      background_color="default", word_wrap=True))

    def _flush(self) -> None:
        """Print what is pending: batched text, and the open Markdown block (after its live view)."""
        if self.stream is not None:
            self.stream.flush()
            self.stream = None
        if self.markdown is not None and self.linker is not None:
            for block in self.markdown.feed(self.linker.flush()):
                self.out.print(block)
            self.linker = None
        if self.markdown is not None:
            self._close_live()
            self.out.print(self.markdown.finish())
            self.markdown = None

    def _malformed(self, e: Malformed) -> None:
        if self.stream is not None:
            self.stream.flush()
        if e.text:  # the raw text is what the model said: it goes where the answer goes
            self.wrote_answer = True
            if self.raw is None:  # a run of raw text (one event a token) is marked once, at its end
                self.raw = (e.reason, CoalescedText(self.out, "yellow"))
            self.raw[1].write(e.text)
        else:
            self._print(self.console, Text(f"[not Harmony: {e.reason}]", style="dim yellow"))

    def _end_raw(self) -> None:
        reason, stream = self.raw
        self.raw = None
        stream.flush()
        if self.out is not self.console:
            self._print(self.out)
        self._print(self.console, Text(f"  [not Harmony: {reason}]", style="dim yellow"))

    def _print(self, console: Console, *objects, **kwargs) -> None:
        """Print above a live region on the same console; a live region on another console is
        taken down for the print (two consoles' cursor moves would garble each other)."""
        live = self.live if self.live is not None and self.live.console is not console else None
        if live is not None:
            live.stop()
        console.print(*objects, **kwargs)
        if live is not None:
            live.start()

    def _redraw(self) -> None:
        """Redraw the live region if it is time (``LIVE_HZ``)."""
        now = time.monotonic()
        if self.live is not None and now - self._drawn_at >= 1 / LIVE_HZ:
            self._drawn_at = now
            self.live.refresh()

    def _close_live(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def close(self) -> None:
        """After the reply (or Ctrl-C): print what is pending, stop any live region."""
        if self.raw is not None:
            self._end_raw()
        self._flush()
        self._close_live()


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n:.1f} TB"


def stats_line(stats: dict, device_type: str = "cpu") -> str:
    """One line after each reply: latency, speeds, token counts, context and memory."""
    def rate(v):
        return f"{v:,.1f} tok/s" if v else "–"

    mem = "VRAM" if device_type == "cuda" else "RSS"
    return (
        f"ttft {stats['time_to_first_token_s']:.2f}s · prefill {rate(stats['prefill_tok_s'])}"
        f" ({stats['prefill_tokens']} new, {stats['reused_tokens']} cached) · decode {rate(stats['decode_tok_s'])}"
        f" · reasoning {stats['reasoning_tokens']:,} · answer {stats['answer_tokens']:,}"
        + (f" · other {stats['other_tokens']:,}" if stats.get("other_tokens") else "") + " tokens"
        f" · context {stats['context_used']:,}/{stats['context_limit']:,}"
        f" · peak {mem} {human_bytes(stats['peak_memory_bytes'])}"
    )

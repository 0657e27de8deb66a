"""``gptoss chat``: the interactive terminal, and one-shot ``--prompt`` answers.

Input comes through prompt-toolkit (line editing, persistent history in gptoss's data folder,
slash-command completion, Alt+Enter or a triple-quote block for several lines, bracketed paste
keeping newlines); replies stream through ``chat_view.ReplyView``; the conversation lives in
``chat_session.ChatSession``. Ctrl-C while the model answers stops it and keeps the partial
answer; Ctrl-C on an empty prompt, or Ctrl-D, leaves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from .chat_session import ChatSession, Settings, Turn
from .chat_tools import TOOL_NAMES, ToolBox, parse_tool_names
from .chat_view import ReplyView, stats_line
from .errors import ContextFullError, GptossError
from .harmony import EFFORTS, Conversation
from .loading import load_engine

COMMANDS = {  # name: (its arguments, what it does), shown by /help in two aligned columns
    "/help": ("", "show this help"),
    "/effort": ("low|medium|high", "reasoning effort from this turn on"),
    "/reasoning": ("show|hide", "stream the reasoning, or collapse it to one line"),
    "/system": ("TEXT", "the model-identity line of the system message"),
    "/developer": ("TEXT", "developer instructions (empty clears them)"),
    "/set": ("temperature|top_p|max_tokens|seed V", "a sampling setting"),
    "/reset": ("", "forget the conversation"),
    "/undo": ("", "remove the last turn"),
    "/regen": ("", "answer the last message again"),
    "/save": ("FILE", "JSON transcript with reasoning (FILE.md: Markdown export)"),
    "/load": ("FILE", "continue a saved JSON transcript"),
    "/copy": ("", "copy the last answer to the clipboard"),
    "/tools": ("[on|off python|browser]", "list the built-in tools, or turn one on or off"),
    "/stats": ("", "figures of the last reply"),
    "/context": ("", "context used, and the rendered system message"),
    "/trim": ("[N]", "drop the N oldest turns (default 1)"),
    "/exit": ("", "leave (Ctrl-D, or Ctrl-C on an empty prompt)"),
}
ARGUMENTS = {
    "/effort": list(EFFORTS),
    "/reasoning": ["show", "hide"],
    "/set": ["temperature", "top_p", "max_tokens", "seed"],
    "/tools": ["on python", "on browser", "off python", "off browser"],
}

# The --json output of ``--prompt`` (JSON Schema, draft 2020-12); documented in README.md.
PROMPT_JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["model", "effort", "prompt", "reasoning", "answer", "tool_calls", "stop_reason", "stats", "random_weights"],
    "properties": {
        "model": {"type": "string"},
        "effort": {"enum": list(EFFORTS)},
        "prompt": {"type": "string"},
        "reasoning": {"type": "string"},
        "answer": {"type": "string"},
        "tool_calls": {"type": "array", "items": {
            "type": "object", "required": ["recipient", "arguments"],
            "properties": {"recipient": {"type": "string"}, "arguments": {"type": "string"},
                           "content_type": {"type": ["string", "null"]}, "channel": {"type": ["string", "null"]},
                           "result": {"type": ["string", "null"]}}}},
        "other": {"type": "string"},
        "raw": {"type": "string"},
        "stop_reason": {"enum": ["stop", "length", "context", "interrupted"]},
        "random_weights": {"type": "boolean"},
        "stats": {"type": "object", "required": [
            "prompt_tokens", "time_to_first_token_s", "prefill_tok_s", "decode_tok_s",
            "reasoning_tokens", "answer_tokens", "context_used", "context_limit", "peak_memory_bytes"],
            "properties": {k: {"type": ["number", "null"]} for k in (
                "prompt_tokens", "reused_tokens", "prefill_tokens", "time_to_first_token_s",
                "prefill_tok_s", "decode_tok_s", "reasoning_tokens", "answer_tokens", "other_tokens",
                "generated_tokens", "context_used", "context_limit", "peak_memory_bytes", "wall_s")}},
    },
}


def run(*, model: str, effort: str, system: str | None, developer: str | None, temperature: float,
        top_p: float, max_tokens: int, context: int, seed: int | None, reasoning: str,
        prompt: str | None, json_out: bool, device: str, dtype: str, yes: bool,
        tools: str | None = None, yes_tools: bool = False) -> None:
    if json_out and prompt is None:
        raise GptossError("--json goes with --prompt", "e.g. gptoss chat --prompt 'hi' --json")
    settings = Settings(max_tokens=max_tokens, reasoning=reasoning)
    for key, value in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens), ("seed", seed)):
        if value is not None:
            settings.set(key, str(value))
    if prompt == "-":
        prompt = read_stdin_prompt()
    if prompt is not None and not prompt.strip():
        raise GptossError("the prompt is empty")
    err = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())  # a pipe: no wrapping
    toolbox = ToolBox(parse_tool_names(tools), yes=yes_tools)
    engine = load_engine(model, device, dtype, context, yes, err, quiet=json_out)
    conv = Conversation(reasoning_effort=effort, developer_instructions=developer or None)
    if system:
        conv.model_identity = system
    session = ChatSession(engine, conv, settings, tools=toolbox)
    try:
        if prompt is not None:
            if not json_out and sys.stdin.isatty():
                toolbox.ask = ConsentPrompt(err)
            answer_once(session, prompt, model, json_out, err)
        else:
            Repl(session, model).loop()
    finally:
        toolbox.close()


def read_stdin_prompt() -> str:
    """``--prompt -``: stdin as UTF-8, less its trailing newlines (as ``$(...)`` strips them), so
    ``echo TEXT | gptoss chat --prompt -`` asks exactly what ``--prompt TEXT`` asks."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is no part of the prompt
    except UnicodeDecodeError as e:
        raise GptossError(f"stdin is not UTF-8 text (byte {e.start})", "pipe UTF-8 text to --prompt -") from None
    return text.rstrip("\r\n")


def answer_once(session: ChatSession, prompt: str, model: str, json_out: bool, err: Console) -> None:
    """``--prompt``: the answer on stdout (reasoning on stderr), or one JSON object."""
    if json_out:
        turn = session.respond(prompt)
        print(json.dumps(turn_json(turn, model, prompt, session), ensure_ascii=False))
        return
    out = Console(highlight=False)
    view = ReplyView(err, show_reasoning=session.settings.reasoning == "show", answer_console=out,
                     show_hint="--reasoning show", cite=_cite(session))
    try:
        turn = session.respond(prompt, view, view.on_token)
    finally:
        view.close()
    err.print(Text(stats_line(turn.stats, session.engine.device.type), style="dim"), soft_wrap=True)
    if turn.stop_reason == "context":
        err.print(Text(f"the reply stopped because it filled the context ({session.context_limit:,} tokens): "
                       "a larger --context (-c) gives it room", style="yellow"), soft_wrap=True)
    if turn.interrupted:
        raise KeyboardInterrupt


def _cite(session: ChatSession):
    return session.tools.url_for_cursor if session.tools is not None else None


class ConsentPrompt:
    """Asks before a tool call runs: yes / no / always (for this session). The call itself was
    shown by the reply view; this says what isolation it runs under."""

    def __init__(self, console: Console, read=None):
        self.console = console
        self.read = read or self._plain_read  # shows the question, returns the answer

    def _plain_read(self, question: str) -> str:
        self.console.print(Text(question, style="bold"), end="")
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    def __call__(self, call, isolation: str) -> str:
        self.console.print(Text(f"  {call.tool}: {isolation}", style="yellow"), soft_wrap=True)
        while True:
            answer = self.read(f"Run this {call.tool} call? [y]es / [n]o / [a]lways for this session: ").strip().lower()
            if answer in ("y", "yes"):
                return "yes"
            if answer in ("n", "no"):
                return "no"
            if answer in ("a", "always"):
                return "always"


def turn_json(turn: Turn, model: str, prompt: str, session: ChatSession) -> dict:
    return {
        "model": model,
        "effort": turn.effort,
        "prompt": prompt,
        "reasoning": turn.reasoning,
        "answer": turn.answer,
        "tool_calls": turn.tool_calls,
        "other": turn.other,
        "raw": turn.raw,
        "stop_reason": turn.stop_reason or "length",
        "random_weights": session.engine.config.random_weights,
        "stats": turn.stats,
    }


class Repl:
    """The interactive loop: read a line, run a command or a turn, repeat."""

    def __init__(self, session: ChatSession, model: str):
        self.session = session
        self.model = model
        self.console = Console(highlight=False, soft_wrap=not sys.stdout.isatty())
        self.tty = sys.stdin.isatty() and sys.stdout.isatty()
        self.prompt = self._make_prompt() if self.tty else None
        if session.tools is not None:
            session.tools.ask = ConsentPrompt(self.console, self._answer)

    def _make_prompt(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        from .resolve import data_dir

        keys = KeyBindings()

        @keys.add("c-c")
        def _(event):  # clear a line with text; leave on an empty one
            buf = event.app.current_buffer
            if buf.text:
                buf.reset()
            else:
                event.app.exit(exception=EOFError)

        @keys.add("escape", "enter")
        def _(event):  # Alt+Enter: a new line inside the message
            event.app.current_buffer.insert_text("\n")

        try:
            data_dir().mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(data_dir() / "chat_history"))
        except OSError:
            history = InMemoryHistory()
        return PromptSession(history=history, completer=SlashCompleter(), key_bindings=keys,
                             complete_while_typing=True, enable_history_search=False,
                             reserve_space_for_menu=0)

    def read(self) -> str:
        """One message: a line, a triple-quoted block, or Alt+Enter-joined lines. EOFError leaves."""
        text = self._line(">>> ")
        if text.strip().startswith('"""'):
            lines = [text.strip()[3:]]
            while not lines[-1].rstrip().endswith('"""'):
                lines.append(self._line("... "))
            lines[-1] = lines[-1].rstrip()[:-3]
            text = "\n".join(lines).strip("\n")
        return text

    def _answer(self, question: str) -> str:
        """A consent answer: not kept in the message history."""
        if self.prompt is not None:
            from prompt_toolkit import prompt as ask
            from prompt_toolkit.formatted_text import FormattedText

            return ask(FormattedText([("bold", question)]))
        self.console.print(Text(question, style="bold"), end="")
        return self._line(question)

    def _line(self, prompt: str) -> str:
        if self.prompt is not None:
            return self.prompt.prompt(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def loop(self) -> None:
        c = self.console
        tools = sorted(self.session.tools.enabled) if self.session.tools is not None else []
        c.print(Text(f"Chatting with {self.model} · effort {self.session.conv.reasoning_effort} · "
                     + (f"tools: {', '.join(tools)} (/tools) · " if tools else "")
                     + '/help for commands, """ or Alt+Enter for several lines, Ctrl-D to leave', style="dim"))
        while True:
            try:
                text = self.read()
            except (EOFError, KeyboardInterrupt):
                c.print(Text("bye", style="dim"))
                return
            if not text.strip():
                continue
            try:
                if text.startswith("/"):
                    if self.command(text) == "exit":
                        return
                else:
                    self.turn(lambda on_event, on_token: self.session.respond(text, on_event, on_token))
            except GptossError as e:
                c.print(Text(f"error: {e}", style="red"))

    def turn(self, respond) -> None:
        view = ReplyView(self.console, show_reasoning=self.session.settings.reasoning == "show",
                         cite=_cite(self.session))
        try:
            turn = respond(view, view.on_token)
        except ContextFullError as e:
            view.close()
            self.console.print(Text(f"context full: {e}", style="yellow"))
            return
        finally:
            view.close()
        if not turn.answer and not turn.raw and not turn.tool_calls and turn.reasoning:
            self.console.print(Text("(no final answer: the reply ended while reasoning)", style="dim"))
        if turn.interrupted:
            self.console.print(Text("[interrupted — the partial answer is kept]", style="yellow"))
        if turn.stop_reason == "context":
            self.console.print(Text(f"the reply stopped because it filled the context ({self.session.context_limit:,} tokens): "
                                    "/trim drops the oldest turns, /reset starts over", style="yellow"))
        self.console.print(Text(stats_line(turn.stats, self.session.engine.device.type), style="dim"))

    # ---- slash commands ----------------------------------------------------------------------
    def command(self, text: str) -> str | None:
        s, c = self.session, self.console
        name, _, arg = text.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return "exit"
        if name == "/help":
            width = max(len(f"{cmd} {args}") for cmd, (args, _) in COMMANDS.items())
            for cmd, (args, doc) in COMMANDS.items():
                c.print(Text.assemble((cmd, "bold"), f" {args}".ljust(width - len(cmd) + 2), doc))
        elif name == "/effort":
            s.set_effort(arg)
            c.print(f"reasoning effort: {arg}")
        elif name == "/reasoning":
            if arg not in ("show", "hide"):
                raise GptossError("use /reasoning show or /reasoning hide")
            s.settings.reasoning = arg
            c.print(f"reasoning: {arg}")
        elif name == "/system":
            s.conv.model_identity = arg or Conversation().model_identity
            c.print("system identity: " + escape(s.conv.model_identity))
        elif name == "/developer":
            s.conv.developer_instructions = arg or None
            c.print("developer instructions " + ("set" if arg else "cleared"))
        elif name == "/set":
            key, _, value = arg.partition(" ")
            if not value.strip():
                raise GptossError("use /set temperature|top_p|max_tokens|seed VALUE")
            s.settings.set(key, value.strip())
            c.print(f"{key} = {getattr(s.settings, key.replace('-', '_'))}")
        elif name == "/reset":
            s.reset()
            c.print("conversation cleared")
        elif name == "/undo":
            t = s.undo()
            c.print("removed the last turn" if t else "nothing to undo")
        elif name == "/regen":
            if s.turns and (s.settings.seed is not None or s.settings.temperature == 0):
                why = ("temperature 0 is greedy (/set temperature 1 samples)" if s.settings.temperature == 0
                       else f"seed {s.settings.seed} is fixed (/set seed none draws a new one)")
                c.print(Text(f"the same answer again: {why}", style="dim"))
            self.turn(lambda on_event, on_token: s.regen(on_event, on_token))
        elif name == "/save":
            if not arg:
                raise GptossError("use /save FILE (.json transcript or .md export)")
            c.print(f"saved {escape(str(s.save(arg)))}")
        elif name == "/load":
            if not arg:
                raise GptossError("use /load FILE")
            s.load(arg)
            c.print(f"loaded {len(s.turns)} turns from {escape(arg)}")
            if any(call["recipient"] == "python" for t in s.turns for call in t.tool_calls):
                c.print(Text("the python kernel starts fresh: variables of the loaded calls are not restored", style="dim"))
        elif name == "/copy":
            self.copy()
        elif name == "/tools":
            self.tools_command(arg)
        elif name == "/stats":
            if not s.turns:
                c.print("no reply yet")
            else:
                for k, v in s.turns[-1].stats.items():
                    c.print(f"{k}: {v}")
        elif name == "/context":
            used = s.context_used()
            c.print(f"context: {used:,} / {s.context_limit:,} tokens ({len(s.turns)} turns)")
            c.print(Text("system message:\n" + s.system_message(), style="dim"))
        elif name == "/trim":
            if arg and not arg.isdigit():
                raise GptossError(f"/trim takes a number of turns, not {arg!r}", "e.g. /trim 2")
            n = s.trim(int(arg) if arg else 1)
            c.print(f"dropped {n} oldest turn(s); context now {s.context_used():,} tokens")
        else:
            raise GptossError(f"unknown command {name}", "/help lists the commands")
        return None

    def tools_command(self, arg: str) -> None:
        s, c = self.session, self.console
        if arg:
            action, _, name = arg.partition(" ")
            if action not in ("on", "off") or not name.strip():
                raise GptossError("use /tools, or /tools on|off python|browser")
            s.set_tool(name.strip(), action == "on")
        for name in TOOL_NAMES:
            on = name in s.tools.enabled
            how = (s.tools.isolation_words(name) if on and name == "python" else
                   (self._search_words() if on else ""))
            c.print(Text.assemble((f"{name:8}", "bold"), ("on " if on else "off", "green" if on else "dim"),
                                  f"  {how}" if how else "",
                                  ("  (always allowed)" if name in s.tools.always else "")))

    def _search_words(self) -> str:
        backend = self.session.tools.browser.backend
        return f"search through {backend.name}" if backend else "no search backend (EXA_API_KEY or SEARXNG_URL); open works"

    def copy(self) -> None:
        turns = self.session.turns
        if not turns or not (turns[-1].answer or turns[-1].raw):
            self.console.print("no answer to copy yet")
            return
        text = turns[-1].answer or turns[-1].raw
        for cmd in (["pbcopy"], ["wl-copy"], ["xclip", "-selection", "clipboard"], ["xsel", "--clipboard", "--input"]):
            if shutil.which(cmd[0]) and (cmd[0] in ("pbcopy",) or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
                if subprocess.run(cmd, input=text.encode(), capture_output=True).returncode == 0:
                    self.console.print(f"copied {len(text)} characters")
                    return
        if self.console.is_terminal:  # OSC 52: the terminal emulator's own clipboard
            import base64

            sys.stdout.write(f"\x1b]52;c;{base64.b64encode(text.encode()).decode()}\x07")
            sys.stdout.flush()
            self.console.print(f"sent {len(text)} characters to the terminal's clipboard (OSC 52)")
        else:
            self.console.print("no clipboard here (no pbcopy, wl-copy, xclip or xsel, not a terminal)")


try:
    from prompt_toolkit.completion import Completer, Completion
except ImportError:  # prompt-toolkit is a dependency; this only keeps --prompt usable without it
    Completer, Completion = object, None


class SlashCompleter(Completer):
    """Completes slash commands and their fixed arguments."""

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        if " " not in text:
            for cmd, (args, doc) in COMMANDS.items():
                if cmd.startswith(text):
                    yield Completion(cmd, start_position=-len(text), display_meta=f"{args} {doc}".strip())
            return
        cmd, _, arg = text.partition(" ")
        for option in ARGUMENTS.get(cmd, ()):
            if option.startswith(arg) and " " not in arg:
                yield Completion(option, start_position=-len(arg))

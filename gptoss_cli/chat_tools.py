"""The built-in tools in a chat: which are on, asking the person before each call, running it.

``ChatSession`` hands every message the model addresses to ``python`` or ``browser.*`` to
``ToolBox.run``, which asks for consent (``ask``: the terminal's yes / no / always; ``--yes-tools``
answers yes), runs the call (``tool_python``, ``tool_browser``) and returns the tool's message in
Harmony: authored by the tool (``python``, ``browser.search``), addressed to the assistant, on the
call's channel, as OpenAI's reference tools write it. A refusal is a tool message too, so the model
knows and can go on without. The tools are declared in the system message (``namespaces``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from .errors import GptossError
from .harmony import Message, ToolNamespace
from .harmony_tools import browser_namespace, python_namespace
from .tool_python import PythonLimits, PythonTool, ToolInterrupted

TOOL_NAMES = ("browser", "python")      # the system message declares them in this order
DECLINED = "The user declined to run this tool call."
MAX_CALLS_PER_TURN = 32   # tool calls the model may make in one turn before it must answer


def parse_tool_names(text: str | None) -> list[str]:
    """``--tools python,browser`` -> the names; a name that is not a tool is one clear error."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    for n in names:
        if n not in TOOL_NAMES:
            raise GptossError(f"unknown tool {n!r}", f"the tools are {', '.join(TOOL_NAMES)}")
    return names


@dataclass(frozen=True)
class ToolCall:
    """A message the model addressed to a built-in tool."""

    message: Message

    @property
    def tool(self) -> str:
        return self.message.recipient.split(".", 1)[0]

    @property
    def function(self) -> str:
        return self.message.recipient.split(".", 1)[1] if "." in self.message.recipient else ""

    def summary(self) -> str:
        """One line for the terminal: the query, the URL, the pattern, or the code's size."""
        if self.tool == "python":
            return f"python: {len(self.message.content.splitlines())} lines of code"
        try:
            args = json.loads(self.message.content or "{}")
        except ValueError:
            args = {}
        args = args if isinstance(args, dict) else {}
        if self.function == "search":
            return f"search: {args.get('query', '?')}"
        if self.function == "open":
            target = args.get("id", -1)
            what = target if isinstance(target, str) else (f"link {target}" if target != -1 else "scroll")
            where = f" on page {args['cursor']}" if args.get("cursor", -1) != -1 else ""
            return f"open: {what}{where}" + (f" at line {args['loc']}" if args.get("loc", -1) not in (-1, None) else "")
        if self.function == "find":
            return f"find: {args.get('pattern', '?')}"
        return f"{self.message.recipient}: {self.message.content[:80]}"


@dataclass(frozen=True)
class ToolResult:
    """An event of ``ChatSession.respond``: a built-in tool answered ``call`` with ``result``
    (``ran``: False when it was declined or is off)."""

    call: Message
    result: Message
    ran: bool


class CallStopped(Exception):
    """Ctrl-C while asking about or running a call; ``message`` is the tool's message to keep."""

    def __init__(self, message: Message):
        super().__init__("stopped")
        self.message = message


def result_message(call: Message, text: str) -> Message:
    """The tool's answer to ``call``: the reference's ``Author(role=tool, name=recipient)``,
    to the assistant, on the call's channel."""
    return Message("tool", text, channel=call.channel, recipient="assistant", name=call.recipient)


class ToolBox:
    """The chat session's built-in tools, their state (kernel, pages) and the consent policy."""

    def __init__(self, enabled=(), yes: bool = False, python_limits: PythonLimits | None = None,
                 browser_backend="env", python_folder=None):
        self.enabled: set[str] = set(enabled)
        self.yes = yes
        self.always: set[str] = set()              # tools allowed for the rest of the session
        self.ask: Callable[[ToolCall, str], str] | None = None   # -> "yes" | "no" | "always"
        self._python_limits, self._python_folder = python_limits, python_folder
        self._backend = browser_backend
        self._python: PythonTool | None = None
        self._browser = None
        if "browser" in self.enabled:
            self.browser  # a bad search configuration is said at start, not at the first search

    @property
    def python(self) -> PythonTool:
        if self._python is None:
            self._python = PythonTool(self._python_folder, self._python_limits)
        return self._python

    @property
    def browser(self):
        if self._browser is None:
            from .tool_browser import Browser, backend_from_env

            backend = backend_from_env() if self._backend == "env" else self._backend
            self._browser = Browser(backend)
        return self._browser

    def namespaces(self) -> list[ToolNamespace]:
        out = []
        if "browser" in self.enabled:
            out.append(browser_namespace())
        if "python" in self.enabled:
            out.append(python_namespace(**self.python.description_words()))
        return out

    def set(self, name: str, on: bool) -> None:
        parse_tool_names(name)
        (self.enabled.add if on else self.enabled.discard)(name)

    def isolation_words(self, tool: str) -> str:
        if tool == "python":
            return self.python.isolation.words
        return "fetches from the web as this machine"

    def url_for_cursor(self, cursor: int) -> str | None:
        return self._browser.url_for_cursor(cursor) if self._browser is not None else None

    @staticmethod
    def wants(message: Message) -> bool:
        """A call to a built-in tool (on or off: an off tool answers that it is off)."""
        r = message.recipient or ""
        return message.role == "assistant" and (r == "python" or r.startswith("browser."))

    def run(self, message: Message) -> tuple[Message, bool]:
        """Ask, run, answer: (the tool's message, whether it ran). Ctrl-C while asking or running
        raises ``CallStopped`` with the tool's message."""
        call = ToolCall(message)
        if call.tool not in self.enabled:
            return result_message(message, f"The {call.tool} tool is turned off in this chat."), False
        try:
            answer = self._consent(call)
        except (KeyboardInterrupt, EOFError):
            raise CallStopped(result_message(message, DECLINED + " (stopped with Ctrl-C)")) from None
        if answer == "always":
            self.always.add(call.tool)
        if answer not in ("yes", "always"):
            why = "" if self.ask is not None else " (not asked: nobody to ask; --yes-tools runs tools without asking)"
            return result_message(message, DECLINED + why), False
        try:
            if call.tool == "python":
                text = self.python.run(message.content)
            else:
                text = self.browser.call(call.function, message.content)
        except ToolInterrupted as e:
            text = (e.output + "\n" if e.output.strip() else "") + "[interrupted by the user (Ctrl-C)]"
            raise CallStopped(result_message(message, text)) from None
        except KeyboardInterrupt:
            raise CallStopped(result_message(message, "[interrupted by the user (Ctrl-C)]")) from None
        except GptossError as e:  # e.g. the kernel would not start: the model and the person both see why
            return result_message(message, f"Error: {e}"), False
        return result_message(message, text), True

    def _consent(self, call: ToolCall) -> str:
        if self.yes or call.tool in self.always:
            return "yes"
        if self.ask is None:
            return "no"
        return self.ask(call, self.isolation_words(call.tool))

    def restart(self) -> None:
        """A fresh kernel and no open pages (``/load``, ``/reset``)."""
        if self._python is not None:
            self._python.restart()
        if self._browser is not None:
            self._browser.pages.clear()

    def close(self) -> None:
        if self._python is not None:
            self._python.shutdown()

"""A conversation with the model: turns, settings, and what each reply cost.

``ChatSession`` sits between the engine (tokens) and the terminal (``chat.py``, ``chat_view.py``):
it renders the conversation in Harmony, runs generation, feeds the streaming parser and hands
its events to whoever displays them, and keeps the transcript. It never prints.

The transcript (``turns``) is the one source of truth: the Harmony history rendered for the next
prompt is rebuilt from it (dropping earlier analysis, as Harmony requires), so ``/undo``,
``/load`` and trimming are list operations. Each turn keeps its reasoning for ``/save``.
Multi-turn chat reuses the KV cache through the engine's prefix matching: a new turn shares
everything up to the previous prompt, so only the new text is prefilled.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import MAX_TEMPERATURE
from .engine import Engine, memory_stats
from .errors import ContextFullError, GptossError, why_not_written
from .harmony import (
    EFFORTS, STOP_TOKEN_IDS, Conversation, Message, ReplyTally, Stop, StreamParser,
    history_after_reply, render_completion, render_conversation,
)
from .chat_tools import MAX_CALLS_PER_TURN, CallStopped, ToolResult  # noqa: F401 (ToolResult re-exported)

TRANSCRIPT_VERSION = 1


@dataclass
class Settings:
    """Sampling and display settings, changed with ``/set`` and ``/reasoning``."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 4096
    seed: int | None = None
    reasoning: str = "show"           # show | hide

    def set(self, key: str, value: str) -> None:
        """Parse and apply ``/set KEY VALUE``; a ``GptossError`` says what is wrong."""
        key = key.replace("-", "_")
        try:
            if key == "temperature":
                v = _number(value, float)
                if not 0 <= v <= MAX_TEMPERATURE:
                    raise ValueError(f"between 0 and {MAX_TEMPERATURE:g}")
            elif key == "top_p":
                v = _number(value, float)
                if not 0 < v <= 1:
                    raise ValueError("in (0, 1]")
            elif key == "max_tokens":
                v = _number(value, int)
                if v < 1:
                    raise ValueError("at least 1")
            elif key == "seed":
                v = None if value.lower() in ("none", "off", "random") else _number(value, int)
            else:
                raise GptossError(f"unknown setting {key!r}", "one of temperature, top_p, max_tokens, seed")
        except ValueError as e:
            raise GptossError(f"bad value {value!r} for {key}: {e}") from None
        setattr(self, key, v)


def _number(value: str, kind: type):
    """``float(value)`` or ``int(value)``, failing with words for the user, not Python's."""
    try:
        v = kind(value)
    except ValueError:
        raise ValueError("not an integer" if kind is int else "not a number") from None
    if v != v:  # NaN
        raise ValueError("not a number")
    return v


@dataclass
class Turn:
    """One user message and the model's reply, as shown and as saved."""

    user: str
    effort: str
    reply: list[Message] = field(default_factory=list)   # parsed messages of the reply
    raw: str = ""                  # text that was not well-formed Harmony (harmony.ReplyTally)
    interrupted: bool = False
    stop_reason: str = ""          # stop | length | context | interrupted
    stats: dict = field(default_factory=dict)

    @property
    def reasoning(self) -> str:
        """The chain of thought: analysis messages, not the tool calls and results made on it."""
        return "".join(m.content for m in self.reply if m.channel == "analysis" and m.role == "assistant"
                       and m.recipient in (None, "all"))

    @property
    def answer(self) -> str:
        return "".join(m.content for m in self.reply if m.channel == "final")

    @property
    def other(self) -> str:
        """Text of well-formed messages that are neither reasoning, answer nor tool call (e.g. a
        commentary preamble, another channel); a message without a channel is in ``raw``."""
        return "".join(m.content for m in self.reply if m.channel not in (None, "analysis", "final")
                       and m.role != "tool" and not (m.role == "assistant" and m.recipient not in (None, "all")))

    @property
    def tool_calls(self) -> list[dict]:
        """The calls of the reply, each with the tool's answer (None when it was not run here)."""
        calls = []
        for i, m in enumerate(self.reply):
            if m.role == "assistant" and m.recipient not in (None, "all"):
                nxt = self.reply[i + 1] if i + 1 < len(self.reply) else None
                result = nxt.content if nxt is not None and nxt.role == "tool" and nxt.name == m.recipient else None
                calls.append({"recipient": m.recipient, "arguments": m.content, "content_type": m.content_type,
                              "channel": m.channel, "result": result})
        return calls

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["reply"] = [m.to_dict() for m in self.reply]
        d.update(reasoning=self.reasoning, answer=self.answer, other=self.other, tool_calls=self.tool_calls)
        return d

    @classmethod
    def from_dict(cls, raw: dict) -> "Turn":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in raw.items() if k in names}
        d["reply"] = [Message.from_dict(m) for m in raw.get("reply", ())]
        return cls(**d)


class ChatSession:
    """The conversation state of ``gptoss chat`` over one engine."""

    def __init__(self, engine: Engine, conversation: Conversation, settings: Settings, tools=None):
        self.engine = engine
        self.conv = conversation       # settings (effort, instructions, tools); messages derived
        self.settings = settings
        self.turns: list[Turn] = []
        self.tools = tools             # chat_tools.ToolBox: runs python/browser calls; None: calls end the turn
        if tools is not None:
            self.conv.builtin_tools = tools.namespaces()

    def set_tool(self, name: str, on: bool) -> None:
        """``/tools on|off NAME``: declared from the next turn on."""
        self.tools.set(name, on)
        self.conv.builtin_tools = self.tools.namespaces()

    # ---- what gets rendered --------------------------------------------------------------------
    def history(self, turns: list[Turn] | None = None) -> list[Message]:
        """The Harmony messages of ``turns`` (default: all), earlier analysis dropped."""
        messages: list[Message] = []
        for t in self.turns if turns is None else turns:
            messages = history_after_reply(messages + [Message("user", t.user)], t.reply)
        return messages

    def conversation(self, extra: list[Message] = ()) -> Conversation:
        return dataclasses.replace(self.conv, messages=self.history() + list(extra))

    def prompt_tokens(self, user_text: str) -> list[int]:
        return render_completion(self.conversation([Message("user", user_text)]), self.engine.tokenizer)

    def system_message(self) -> str:
        from .harmony import system_text

        return system_text(self.conv)

    def context_used(self) -> int:
        """Tokens the conversation so far takes when rendered."""
        return len(render_conversation(self.conversation(), self.engine.tokenizer))

    @property
    def context_limit(self) -> int:
        return self.engine.max_context

    # ---- a turn ----------------------------------------------------------------------------------
    def respond(self, user_text: str, on_event: Callable = lambda e: None,
                on_token: Callable = lambda channel: None) -> Turn:
        """Generate the reply to ``user_text``, streaming parser events to ``on_event``.

        When the model calls a built-in tool (``python``, ``browser.*``) and ``self.tools`` is set,
        the call is run (after consent), its result is sent to ``on_event`` as a ``ToolResult``
        and added to the reply, and the model goes on in the same turn.
        Ctrl-C (KeyboardInterrupt) stops generation or the running tool; the partial reply is kept.
        A prompt that does not fit raises ``ContextFullError`` and changes nothing.
        """
        tokens = self.prompt_tokens(user_text)
        room = self.context_limit - len(tokens)
        if room < 1:
            raise ContextFullError(
                f"the conversation needs {len(tokens)} tokens; the context holds {self.context_limit}",
                "/trim drops the oldest turns, /reset starts over, or restart with a larger --context",
            )
        turn = Turn(user=user_text, effort=self.conv.reasoning_effort)
        tally = ReplyTally()                   # tokens by channel, and the raw text, over every round
        prompt_len, generated, calls = len(tokens), 0, 0
        t0 = time.perf_counter()
        while True:
            parser, stopped_on_call = self._generate(turn, tokens, room, generated, tally, on_event, on_token)
            generated += len(parser.tokens)
            if turn.interrupted or turn.stop_reason != "stop" or not stopped_on_call or self.tools is None:
                break
            call = turn.reply[-1] if turn.reply else None
            if call is None or not self.tools.wants(call) or calls >= MAX_CALLS_PER_TURN:
                break
            calls += 1
            try:
                result, ran = self.tools.run(call)
            except CallStopped as e:
                result, ran = e.message, True
                turn.interrupted, turn.stop_reason = True, "interrupted"
            turn.reply.append(result)
            on_event(ToolResult(call, result, ran))
            if turn.interrupted:
                break
            tokens = render_completion(self.conversation([Message("user", user_text), *turn.reply]),
                                       self.engine.tokenizer)
            room = self.context_limit - len(tokens)
            if room < 1 or generated >= self.settings.max_tokens:
                turn.stop_reason = "context" if room < 1 else "length"
                break
        turn.raw = "".join(tally.raw)
        turn.stats = self._stats(tally.counts, prompt_len, time.perf_counter() - t0,
                                 context_used=len(tokens) + len(parser.tokens))
        self.turns.append(turn)
        return turn

    def _generate(self, turn: Turn, tokens: list[int], room: int, generated: int, tally: ReplyTally,
                  on_event: Callable, on_token: Callable) -> tuple[StreamParser, bool]:
        """One round of generation into ``turn``: (its parser, whether it stopped on ``<|call|>``)."""
        parser = StreamParser(self.engine.tokenizer)
        s = self.settings
        gen = self.engine.generate(
            tokens, max_new_tokens=max(1, min(s.max_tokens - generated, room)), temperature=s.temperature,
            top_p=s.top_p, stop_tokens=STOP_TOKEN_IDS, seed=s.seed,
        )
        called = False

        def emit(events, counted):
            nonlocal called
            for kind, n in counted:
                for _ in range(n):
                    on_token(kind)
            for e in events:
                called = called or (isinstance(e, Stop) and e.kind == "call")
                on_event(e)

        try:
            for tok in gen:
                events = parser.feed(tok)
                emit(events, tally.feed(parser, events))
            turn.stop_reason = self.engine.last_stats.stop_reason
            if turn.stop_reason == "length" and len(parser.tokens) >= room:
                turn.stop_reason = "context"         # the reply filled the context
        except KeyboardInterrupt:
            gen.close()
            turn.interrupted, turn.stop_reason = True, "interrupted"
        finally:
            events = parser.finish()
            emit(events, tally.finish(events))
            turn.reply.extend(parser.messages)
        return parser, called

    def _stats(self, counts: dict, prompt_len: int, wall_s: float, context_used: int | None = None) -> dict:
        st = self.engine.last_stats
        generated = sum(counts.values())
        mem = memory_stats(self.engine.device)
        return {
            "prompt_tokens": prompt_len,
            "reused_tokens": st.reused_tokens,
            "prefill_tokens": st.prefill_tokens,
            "time_to_first_token_s": round(st.first_token_s, 4),
            "prefill_tok_s": round(st.prefill_tokens / st.prefill_s, 2) if st.prefill_s > 0 else None,
            "decode_tok_s": round(st.decode_tokens / st.decode_s, 2) if st.decode_s > 0 else None,
            "reasoning_tokens": counts["analysis"],
            "answer_tokens": counts["final"],
            "other_tokens": counts["other"],
            "generated_tokens": generated,
            "context_used": prompt_len + generated if context_used is None else context_used,
            "context_limit": self.context_limit,
            "peak_memory_bytes": mem.get("peak_allocated", mem.get("peak_rss")),
            "wall_s": round(wall_s, 4),
        }

    # ---- editing the conversation -------------------------------------------------------------
    def undo(self) -> Turn | None:
        return self.turns.pop() if self.turns else None

    def regen(self, on_event: Callable = lambda e: None, on_token: Callable = lambda c: None) -> Turn:
        if not self.turns:
            raise GptossError("nothing to regenerate yet")
        last = self.turns.pop()
        try:
            return self.respond(last.user, on_event, on_token)
        except ContextFullError:
            self.turns.append(last)
            raise

    def reset(self) -> None:
        self.turns.clear()
        if self.tools is not None:
            self.tools.restart()

    def trim(self, n: int = 1) -> int:
        """Drop the ``n`` oldest turns; returns how many were dropped."""
        n = max(0, min(n, len(self.turns)))
        del self.turns[:n]
        return n

    def set_effort(self, effort: str) -> None:
        if effort not in EFFORTS:
            raise GptossError(f"unknown effort {effort!r}", f"use {', '.join(EFFORTS)}")
        self.conv.reasoning_effort = effort

    # ---- transcripts ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        settings = self.conv.to_dict()
        settings.pop("messages")
        return {
            "version": TRANSCRIPT_VERSION,
            "conversation": settings,
            "settings": dataclasses.asdict(self.settings),
            "turns": [t.to_dict() for t in self.turns],
        }

    def save(self, path: str | Path) -> Path:
        """JSON transcript (with reasoning), or a Markdown export when the name ends in .md."""
        path = Path(path).expanduser()
        text = self.to_markdown() if path.suffix.lower() in (".md", ".markdown") else json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        except OSError as e:
            raise GptossError(f"cannot write {path}: {why_not_written(path, e)}") from None
        return path

    def load(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GptossError(f"{path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GptossError(f"{path} is not a JSON transcript ({e})", "/load reads files written by /save FILE.json") from None
        if not isinstance(raw, dict) or "turns" not in raw:
            raise GptossError(f"{path} is not a gptoss transcript", "/load reads files written by /save FILE.json")
        try:
            conv = Conversation.from_dict({**raw.get("conversation", {}), "messages": []})
            turns = [Turn.from_dict(t) for t in raw["turns"]]
            settings = Settings(**raw.get("settings", {}))
        except (TypeError, KeyError, AttributeError) as e:
            raise GptossError(f"{path} is not a valid transcript ({e})") from None
        self.conv, self.turns, self.settings = conv, turns, settings
        if self.tools is not None:  # the tools on now are declared; the kernel starts fresh
            self.conv.builtin_tools = self.tools.namespaces()
            self.tools.restart()

    def to_markdown(self) -> str:
        c = self.conv
        lines = ["# gptoss chat", "", f"- reasoning effort: {c.reasoning_effort}"]
        if c.developer_instructions:
            lines.append(f"- developer instructions: {c.developer_instructions}")
        for i, t in enumerate(self.turns, 1):
            lines += ["", f"## Turn {i}", "", "**User**", "", t.user, ""]
            if t.reasoning:
                lines += [f"<details><summary>Reasoning ({t.effort}, {t.stats.get('reasoning_tokens', '?')} tokens)</summary>", "", t.reasoning, "", "</details>", ""]
            for call in t.tool_calls:
                lang = "python" if call["recipient"] == "python" else "json"
                lines += [f"**Tool call** `{call['recipient']}`", "", f"```{lang}", call["arguments"], "```", ""]
                if call["result"] is not None:
                    lines += ["**Tool result**", "", "```text", call["result"], "```", ""]
            lines += ["**Assistant**", "", t.answer or t.raw or "_(no answer)_"]
            if t.interrupted:
                lines += ["", "_(interrupted)_"]
        return "\n".join(lines) + "\n"

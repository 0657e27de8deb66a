"""Harmony: gpt-oss's chat format. Rendering conversations to tokens, parsing streamed output.

gpt-oss was trained on Harmony only, token for token, so this module reproduces OpenAI's reference
implementation (the ``openai-harmony`` package, ``src/encoding.rs``; the tests use it as the
oracle). A message is ``<|start|>{author}[ to={recipient}][<|channel|>{channel}][ {content type}]
<|message|>{text}<|end|>``; each piece is tokenized on its own, as the reference does. The system
and developer messages are built from a ``Conversation``'s settings; a completion prompt ends with
``<|start|>assistant``; the model ends a turn with ``<|return|>`` or a tool call with ``<|call|>``.

This module knows tokens and text, never tensors: the engine below it generates token ids, the chat
above it decides what to show.
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import re
from dataclasses import dataclass, field
from typing import NamedTuple, Union

import tiktoken

from .errors import GptossError
from .harmony_tools import (  # noqa: F401 (re-exported)
    FunctionTool, ToolNamespace, builtin_tools_section, schema_to_typescript, tools_section,
)
from .tokenizer import FIRST_SPECIAL_ID, SPECIAL_TOKENS

ROLES = ("system", "developer", "user", "assistant", "tool")
EFFORTS = ("low", "medium", "high")
CHANNELS = ("analysis", "commentary", "final")
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
RETURN, CALL, CONSTRAIN = "<|return|>", "<|call|>", "<|constrain|>"
START_ID, END_ID, MESSAGE_ID = SPECIAL_TOKENS[START], SPECIAL_TOKENS[END], SPECIAL_TOKENS[MESSAGE]
CHANNEL_ID, CONSTRAIN_ID = SPECIAL_TOKENS[CHANNEL], SPECIAL_TOKENS[CONSTRAIN]
RETURN_ID, CALL_ID = SPECIAL_TOKENS[RETURN], SPECIAL_TOKENS[CALL]
# Generation stops on these: the end of the turn, or a tool call waiting for its result.
STOP_TOKEN_IDS = (RETURN_ID, CALL_ID)
_ID_TO_SPECIAL = {i: name for name, i in SPECIAL_TOKENS.items()}


def _today() -> str:
    return datetime.date.today().isoformat()


# ---- the data: messages, tools, conversation ---------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One Harmony message. ``name`` is the author name; a tool result's author is the tool
    (``functions.get_weather``). ``content_type`` may begin with ``<|constrain|>`` (e.g.
    ``<|constrain|>json``), which renders as that special token."""

    role: str
    content: str = ""
    channel: str | None = None      # analysis | commentary | final (assistant messages)
    recipient: str | None = None    # functions.NAME for a tool call; "assistant" for a tool result
    content_type: str | None = None
    name: str | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; one of {', '.join(ROLES)}")
        if self.role == "tool" and not self.name:
            raise ValueError("a tool message needs the tool's name as its author name")
        if not isinstance(self.content, str):
            raise ValueError("message content must be text")

    @classmethod
    def tool_result(cls, tool_name: str, output: str) -> "Message":
        """The message that carries a function's output back to the model (Harmony's tool role)."""
        return cls("tool", output, channel="commentary", recipient="assistant", name=tool_name)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: dict) -> "Message":
        try:
            return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})
        except (TypeError, ValueError) as e:
            raise GptossError(f"not a Harmony message: {e}") from None


@dataclass
class Conversation:
    """The settings that make the system and developer messages, and the messages that follow.

    The system and developer messages are rendered from the settings at each call, so changing
    ``reasoning_effort`` between turns takes effect on the next render.
    """

    messages: list[Message] = field(default_factory=list)
    model_identity: str | None = DEFAULT_IDENTITY
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF
    current_date: str | None = field(default_factory=_today)  # YYYY-MM-DD; None leaves it out
    reasoning_effort: str = "medium"
    developer_instructions: str | None = None
    tools: list[FunctionTool] = field(default_factory=list)
    builtin_tools: list[ToolNamespace] = field(default_factory=list)  # python, browser: the system message

    def __post_init__(self):
        if self.reasoning_effort not in EFFORTS:
            raise GptossError(
                f"unknown reasoning effort {self.reasoning_effort!r}", f"use {', '.join(EFFORTS)}"
            )

    def add_reply(self, reply: list[Message]) -> None:
        """Append a parsed model reply the way the next turn should see it (see history_after_reply)."""
        self.messages[:] = history_after_reply(self.messages, reply)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["messages"] = [m.to_dict() for m in self.messages]
        d["tools"] = [t.to_dict() for t in self.tools]
        d["builtin_tools"] = [t.to_dict() for t in self.builtin_tools]
        return d

    @classmethod
    def from_dict(cls, raw: dict) -> "Conversation":
        try:
            settings = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
            settings["messages"] = [Message.from_dict(m) for m in raw.get("messages", ())]
            settings["tools"] = [FunctionTool.from_dict(t) for t in raw.get("tools", ())]
            settings["builtin_tools"] = [ToolNamespace.from_dict(t) for t in raw.get("builtin_tools", ())]
            return cls(**settings)
        except (TypeError, AttributeError) as e:
            raise GptossError(f"not a saved conversation: {e}") from None


def history_after_reply(history: list[Message], reply: list[Message]) -> list[Message]:
    """The conversation to render next, after the model's ``reply`` (its parsed messages).

    Harmony's rule: once a turn ends with a message on the ``final`` channel, the chain of
    thought (``analysis``) of that turn and of earlier ones is dropped, with the built-in tools'
    calls and results made on it (as the reference's ``auto_drop_analysis`` drops every message on
    that channel); a turn that ends in a tool call keeps its analysis, since the model continues it
    after the tool's result.
    """
    messages = [*history, *reply]
    ended_final = bool(reply) and reply[-1].role == "assistant" and reply[-1].channel == "final"
    if ended_final:
        messages = [m for m in messages if m.channel != "analysis"]
    return messages


# ---- rendering ---------------------------------------------------------------------------------


def system_text(conv: Conversation) -> str:
    """The system message: identity and dates, reasoning effort, the channels (Harmony spec)."""
    top = [conv.model_identity] if conv.model_identity is not None else []
    if conv.knowledge_cutoff is not None:
        top.append(f"Knowledge cutoff: {conv.knowledge_cutoff}")
    if conv.current_date is not None:
        top.append(f"Current date: {conv.current_date}")
    sections = ["\n".join(top)] if top else []
    sections.append(f"Reasoning: {conv.reasoning_effort}")
    if conv.builtin_tools:
        sections.append(builtin_tools_section(conv.builtin_tools))
    channels = f"# Valid channels: {', '.join(CHANNELS)}. Channel must be included for every message."
    if conv.tools:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    sections.append(channels)
    return "\n\n".join(sections)


def developer_text(conv: Conversation) -> str | None:
    """The developer message (instructions, then function tools), or None when it has neither."""
    sections = []
    if conv.developer_instructions is not None:
        sections += ["# Instructions", conv.developer_instructions]
    if conv.tools:
        sections.append(tools_section(conv.tools))
    return "\n\n".join(sections) if sections else None


def render_message(message: Message, encoding: tiktoken.Encoding) -> list[int]:
    """One message; each header piece is tokenized separately, as the reference renders it."""
    text = encoding.encode_ordinary
    tokens = [START_ID]
    if message.role == "tool":
        tokens += text(message.name)
    else:
        tokens += text(message.role) + (text(f":{message.name}") if message.name is not None else [])
    if message.recipient is not None and message.recipient != "all":
        tokens += text(f" to={message.recipient}")
    if message.channel is not None:
        tokens += [CHANNEL_ID] + text(message.channel)
    if message.content_type is not None:
        if message.content_type.startswith(CONSTRAIN):
            tokens += text(" ") + [CONSTRAIN_ID] + text(message.content_type[len(CONSTRAIN):])
        else:
            tokens += text(f" {message.content_type}")
    tokens += [MESSAGE_ID] + text(message.content)
    tokens.append(CALL_ID if message.role == "assistant" and message.recipient is not None else END_ID)
    return tokens


def _visible_messages(messages: list[Message]) -> list[Message]:
    """The reference's ``auto_drop_analysis``: when the last assistant message is ``final``,
    analysis messages before the first ``final`` message are not rendered."""
    last_assistant = next((m for m in reversed(messages) if m.role == "assistant"), None)
    if last_assistant is None or last_assistant.channel != "final":
        return messages
    first_final = next(i for i, m in enumerate(messages) if m.channel == "final")
    return [m for i, m in enumerate(messages) if not (i < first_final and m.channel == "analysis")]


def render_conversation(conv: Conversation, encoding: tiktoken.Encoding) -> list[int]:
    """System message, developer message (if any), then the conversation's messages."""
    head = [Message("system", system_text(conv))]
    if (developer := developer_text(conv)) is not None:
        head.append(Message("developer", developer))
    tokens = []
    for message in head + _visible_messages(head + conv.messages)[len(head):]:
        tokens += render_message(message, encoding)
    return tokens


def render_completion(conv: Conversation, encoding: tiktoken.Encoding) -> list[int]:
    """The prompt for the model's next turn: the conversation, then ``<|start|>assistant``."""
    return render_conversation(conv, encoding) + [START_ID] + encoding.encode_ordinary("assistant")


# ---- parsing the model's output, one token at a time ------------------------------------------


@dataclass(frozen=True)
class MessageStart:
    """A message header was read: what follows is this message's text."""

    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None


@dataclass(frozen=True)
class TextDelta:
    """New text of the current message; never a split UTF-8 character."""

    text: str
    channel: str | None


@dataclass(frozen=True)
class MessageEnd:
    """The current message is complete (``<|end|>``, a stop token, or the end of the stream)."""

    message: Message


@dataclass(frozen=True)
class Stop:
    """The model ended its turn (``<|return|>``) or called a tool (``<|call|>``)."""

    token_id: int
    kind: str  # "return" | "call"


@dataclass(frozen=True)
class Malformed:
    """Output that is not well-formed Harmony. ``text`` is raw text no other event carries
    (a broken header, text outside any message); empty when the text went into a message."""

    reason: str
    text: str = ""


Event = Union[MessageStart, TextDelta, MessageEnd, Stop, Malformed]

_ASCII_SPACE = re.compile(r"[ \t\n\x0c\r]+")


class HeaderError(ValueError):
    """A message header the reference parser would reject."""


class Header(NamedTuple):
    role: str
    name: str | None
    channel: str | None
    recipient: str | None
    content_type: str | None


def _clip(words: str, limit: int = 40) -> str:
    """Header words quoted in an error: the raw header is shown beside it, so a few suffice."""
    return words if len(words) <= limit else words[: limit - 1] + "…"


def parse_header(text: str, role: str | None) -> Header:
    """The fields of a decoded header, by the reference's rules (``parse_header_from_string``):
    ``<|channel|>NAME`` anywhere, then the role (unless the prompt gave it), then
    ``[to=]recipient`` and a content type. Raises HeaderError where the reference errors."""
    channel, name = None, None
    if (at := text.find(CHANNEL)) >= 0:
        after = text[at + len(CHANNEL):]
        end = next((i for i, c in enumerate(after) if c.isspace() or c == "<"), len(after))
        if end == 0:
            raise HeaderError("<|channel|> without a channel name")
        channel, text = after[:end], text[:at] + after[end:]
    text = text.strip()
    if CONSTRAIN in text:
        text = text.replace(CONSTRAIN, " " + CONSTRAIN).strip()
    parts = [p for p in _ASCII_SPACE.split(text) if p]
    if role is None:
        if not parts:
            raise HeaderError("message header without a role")
        if parts[0] in ROLES:
            role = parts[0]
            name = role if role == "tool" else None
        elif len(parts) > 1 or parts[0].startswith("to="):
            role, name = "tool", parts.pop(0)  # an unknown author with a recipient: a tool
        else:
            raise HeaderError(f"unknown role {_clip(parts[0])!r}")
    if parts and parts[0] == role:
        parts.pop(0)
    recipient = content_type = None
    if parts:
        n_parts, last = len(parts), parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif n_parts == 1 and not last.startswith(CONSTRAIN):
            recipient = last
        else:
            content_type = last
            if parts:
                recipient = parts.pop().removeprefix("to=")
    if parts:
        raise HeaderError(f"unexpected words in message header: {_clip(' '.join(parts))!r}")
    return Header(role, name, channel, recipient, content_type)


class StreamParser:
    """Parses the model's output as it is generated: ``feed`` one token id, get events back.

    Built on the reference's ``StreamableParser`` (same messages for the same tokens), but it
    never raises: where the reference errors (text outside a message, a broken or truncated
    header, text after the stop) this parser reports ``Malformed`` with the raw text and goes on.
    Inside a message only ``<|end|>``, ``<|return|>`` and ``<|call|>`` end it; another special
    token is kept as its literal text, as the reference keeps it, and reported as ``Malformed``.
    ``role`` is the role the prompt already opened (``<|start|>assistant``); None expects
    ``<|start|>`` first.

    One header is read differently on purpose: when the only word left after the channel is a
    ``<|constrain|>`` type (``<|channel|>final <|constrain|>json``), this parser reads a content
    type and the reference a recipient (``to=<|constrain|>json``). Both renderers write a message
    with that content type and no recipient as exactly this header, so ours gives back the message
    that was rendered, where the reference's would render as a tool call to ``<|constrain|>json``.
    """

    MAX_HEADER_TOKENS = 128  # longer than any real header: past it, the header is shown as text

    def __init__(self, encoding: tiktoken.Encoding, role: str | None = "assistant"):
        if role is not None and (role not in ROLES or role == "tool"):
            raise ValueError(f"a parser opens with a role of {ROLES[:4]} or None, not {role!r}")
        self.encoding = encoding
        self.messages: list[Message] = []  # completed messages, in order
        self.tokens: list[int] = []        # every token fed
        self._role = role                  # role of the header being read, if the prompt gave it
        self._header: list[int] | None = [] if role else None  # None: outside any message
        self._start: MessageStart | None = None                 # set while inside a message
        self._name: str | None = None
        self._text: list[str] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stopped = False

    @property
    def reading_header(self) -> bool:
        """Between a message's ``<|start|>`` (or the reply's opening) and its ``<|message|>``."""
        return self._header is not None

    @property
    def current(self) -> MessageStart | None:
        """The header of the message whose text is being read, if any."""
        return self._start

    def feed(self, token_id: int) -> list[Event]:
        """Consume one generated token; return what it completed, in order."""
        self.tokens.append(token_id)
        try:
            piece = self.encoding.decode_single_token_bytes(token_id)
        except (KeyError, OverflowError, TypeError):
            return [Malformed(f"unknown token id {token_id!r}")]
        if self._start is not None:
            return self._feed_content(token_id, piece)
        if self._header is not None:
            return self._feed_header(token_id)
        return self._feed_outside(token_id, piece)

    def finish(self) -> list[Event]:
        """The stream ended (e.g. max tokens): close what is open, surface what is left."""
        if self._start is not None:
            return self._end_message()
        if self._header:
            events = [Malformed("output ended inside a message header", self._header_text())]
            self._header = None
            return events
        self._header = None
        return self._flush_outside()

    # -- states ------------------------------------------------------------------------------
    def _feed_content(self, token_id: int, piece: bytes) -> list[Event]:
        if token_id in (END_ID, RETURN_ID, CALL_ID):
            return self._end_message() + self._stop(token_id)
        events: list[Event] = []
        if token_id >= FIRST_SPECIAL_ID:
            events.append(Malformed(f"special token {_ID_TO_SPECIAL[token_id]} inside a message"))
        if text := self._utf8.decode(piece):
            self._text.append(text)
            events.append(TextDelta(text, self._start.channel))
        return events

    def _feed_header(self, token_id: int) -> list[Event]:
        if token_id == MESSAGE_ID:
            return self._begin_message()
        if token_id in (END_ID, RETURN_ID, CALL_ID, START_ID):
            events = []
            if self._header:
                events.append(Malformed(f"message header cut off by {_ID_TO_SPECIAL[token_id]}",
                                        self._header_text()))
            self._header, self._role = ([], None) if token_id == START_ID else (None, None)
            return events + self._stop(token_id)
        self._header.append(token_id)
        if len(self._header) <= self.MAX_HEADER_TOKENS:
            return []
        events = [Malformed("no <|message|> after a long header", self._header_text())]
        return events + self._open(MessageStart(self._role or "assistant", None, None, None), None)

    def _feed_outside(self, token_id: int, piece: bytes) -> list[Event]:
        if token_id == START_ID:
            events = self._flush_outside()
            self._header, self._role, self._stopped = [], None, False
            return events
        if token_id in STOP_TOKEN_IDS:
            return self._flush_outside() + self._stop(token_id)
        text = self._utf8.decode(piece)
        reason = "text after the stop" if self._stopped else "text outside a message"
        return [Malformed(reason, text)] if text else []

    # -- helpers -----------------------------------------------------------------------------
    def _header_text(self) -> str:
        return self.encoding.decode(self._header, errors="replace")

    def _begin_message(self) -> list[Event]:
        raw = self._header_text()
        try:
            header = parse_header(raw, self._role)
        except HeaderError as e:
            fallback = MessageStart(self._role or "assistant", None, None, None)
            return [Malformed(f"unreadable message header: {e}", raw)] + self._open(fallback, None)
        events: list[Event] = []
        if header.role == "assistant" and header.channel is None:
            events.append(Malformed("assistant message without a channel"))
        start = MessageStart(header.role, header.channel, header.recipient, header.content_type)
        return events + self._open(start, header.name)

    def _open(self, start: MessageStart, name: str | None) -> list[Event]:
        self._header, self._role = None, None
        self._start, self._name, self._text = start, name, []
        self._utf8.reset()
        return [start]

    def _end_message(self) -> list[Event]:
        events: list[Event] = []
        if tail := self._utf8.decode(b"", final=True):
            self._text.append(tail)
            events.append(TextDelta(tail, self._start.channel))
        s = self._start
        message = Message(s.role, "".join(self._text), s.channel, s.recipient, s.content_type,
                          self._name)
        self.messages.append(message)
        self._start, self._name, self._text = None, None, []
        return events + [MessageEnd(message)]

    def _stop(self, token_id: int) -> list[Event]:
        if token_id not in STOP_TOKEN_IDS:
            return []
        self._stopped = True
        return [Stop(token_id, "return" if token_id == RETURN_ID else "call")]

    def _flush_outside(self) -> list[Event]:
        text = self._utf8.decode(b"", final=True)
        reason = "text after the stop" if self._stopped else "text outside a message"
        return [Malformed(reason, text)] if text else []


class ReplyTally:
    """A reply's tokens by where they went, and its raw text, fed token by token beside the
    parser (``feed(parser, events)`` with the events of each token). The chat session and the
    server both count with it, so their figures agree.

    Tokens: "analysis" (reasoning), "final" (answer) or "other" (tool calls, other channels, text
    outside any message). A header's tokens count with the message they open, so a well-formed
    reply has no "other" tokens beyond its tool calls. Raw text: what was not well-formed Harmony,
    in order: text outside a message or in a broken header, and the content of a message whose
    header named no channel (the parser opens one after a header it cannot read)."""

    def __init__(self):
        self.counts = {"analysis": 0, "final": 0, "other": 0}
        self.raw: list[str] = []
        self._open: MessageStart | None = None
        self._header = 0                      # tokens of the header being read

    def feed(self, parser: StreamParser, events: list[Event]) -> list[tuple[str, int]]:
        """Take one token's events; return what it counted: (kind, tokens), in order."""
        inside = self._open
        self._take(events)
        if inside is not None:                # a token of the open message, or the one ending it
            return self._count(inside, 1)
        if self._open is not None:            # <|message|>: it and its header join the message
            n, self._header = self._header + 1, 0
            return self._count(self._open, n)
        if parser.reading_header:
            self._header += 1
            return []
        n, self._header = self._header + 1, 0  # outside any message (a cut-off header included)
        return self._count(None, n)

    def finish(self, events: list[Event]) -> list[tuple[str, int]]:
        """The parser's ``finish()`` events; a header left unfinished counts as "other"."""
        self._take(events)
        n, self._header = self._header, 0
        return self._count(None, n) if n else []

    def _take(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, MessageStart):
                self._open = e
            elif isinstance(e, MessageEnd):
                self._open = None
            elif isinstance(e, Malformed) and e.text:
                self.raw.append(e.text)
            elif isinstance(e, TextDelta) and self._open is not None and self._open.channel is None:
                self.raw.append(e.text)

    def _count(self, message: MessageStart | None, n: int) -> list[tuple[str, int]]:
        kind = message.channel if message is not None and message.channel in ("analysis", "final") else "other"
        self.counts[kind] += n
        return [(kind, n)]

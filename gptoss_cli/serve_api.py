"""The OpenAI wire formats of ``gptoss serve``: requests into Harmony, the model's output back out.

This module knows JSON and Harmony, never the engine or the network: ``serve.py`` runs the model
and the HTTP server, this turns a request body into a ``GenRequest`` (a Harmony ``Conversation``
plus sampling settings) and the parsed output into Chat Completions objects and chunks
(``serve_responses.py`` does the same for the Responses API).

Mapping (as OpenAI's gpt-oss guide and vLLM do it): system and developer messages become Harmony's
developer instructions (Harmony's own system message carries the identity, the date and the
reasoning effort); an assistant message's ``content`` is its final-channel text, its
``reasoning_content`` (or ``reasoning``) its analysis, each ``tool_calls`` entry a commentary
message to ``functions.NAME``; a ``tool`` message is the result of the call its ``tool_call_id``
names. Back out, the analysis channel is ``reasoning_content``, the final channel ``content``,
calls to functions ``tool_calls``.

Every response also carries ``harmony``: the reply as gptoss's own parser read it (answer,
reasoning, tool calls with their content type, raw text that was not well-formed Harmony, the
parser's complaints, token counts per channel). Clients ignore it; ``gptoss eval --endpoint``
uses it, so an eval against our server grades exactly what an in-process eval grades.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from .config import MAX_TEMPERATURE
from .harmony import (EFFORTS, Conversation, FunctionTool, Malformed, Message, MessageEnd, MessageStart, ReplyTally,
                      StreamParser, TextDelta)

MAX_STOPS = 4


class ApiError(Exception):
    """A request the server refuses: an OpenAI-style error object with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


@dataclass
class GenRequest:
    """What to generate, whichever API asked: the conversation and how to sample its reply."""

    conversation: Conversation
    max_tokens: int | None = None     # None: as many as the context has room for
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False          # vLLM's and SGLang's extension, for benchmarks


# ---- checking request fields ------------------------------------------------------------------


def number_field(body: dict, key: str, default, low: float, high: float, low_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{key}' must be a number", key)
    if value > high or value < low or (low_open and value == low):
        raise bad(f"'{key}' must be {'above' if low_open else 'at least'} {low:g} and at most {high:g}; got {value}", key)
    return float(value)


def int_field(body: dict, key: str, low: int = -(2**63), high: int = 2**64 - 1):
    """An optional integer in [low, high] (default: what a 64-bit seed holds)."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{key}' must be an integer", key)
    if not low <= value <= high:
        raise bad(f"'{key}' must be at least {low}; got {value}" if value < low
                  else f"'{key}' must be at most {high}; got {value}", key)
    return value


def bool_field(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{key}' must be true or false", key)
    return value


def effort_field(value, param: str) -> str:
    if value is None:
        return "medium"
    if value not in EFFORTS:
        raise bad(f"'{param}' must be one of {', '.join(EFFORTS)}; got {value!r}", param)
    return value


def stops_field(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"'stop' takes at most {MAX_STOPS} strings", "stop")
    return stops


def text_of(content, param: str) -> str:
    """A message's text: a string, or a list of text parts (``{"type": "text", "text": ...}``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise bad(f"{param}: only text content is supported, not {kind or type(part).__name__!r}", param)
        return "".join(out)
    raise bad(f"{param} must be a string or a list of text parts", param)


def function_tools(tools, tool_choice, nested: bool) -> list[FunctionTool]:
    """``tools`` of type function (chat: ``{"function": {...}}``; responses: flat) as Harmony
    tools; ``tool_choice: "none"`` declares none. The model decides whether to call one: other
    choices are accepted but not enforced (Harmony has no constrained decoding here)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad("'tools' must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad(f"tools[{i}]: only tools of type 'function' are supported", f"tools[{i}]")
        spec = tool.get("function") if nested else tool
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise bad(f"tools[{i}] needs a function name", f"tools[{i}]")
        params = spec.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad(f"tools[{i}]: 'parameters' must be a JSON schema object", f"tools[{i}]")
        out.append(FunctionTool(spec["name"], spec.get("description") or "", params))
    if tool_choice not in (None, "auto", "none", "required") and not isinstance(tool_choice, dict):
        raise bad("'tool_choice' must be none, auto, required or a function", "tool_choice")
    return [] if tool_choice == "none" else out


def call_message(name: str, arguments: str) -> Message:
    """An assistant's call of function ``name``, as Harmony renders it in the history."""
    return Message("assistant", arguments, channel="commentary", recipient=f"functions.{name}",
                   content_type="<|constrain|>json")


def conversation(messages: list[Message], instructions: list[str], effort: str, tools: list[FunctionTool],
                 template_kwargs) -> Conversation:
    """The Harmony conversation; ``chat_template_kwargs.current_date`` (vLLM's field for template
    settings) fixes the system message's date, as ``gptoss eval`` does for reproducible runs."""
    kw = template_kwargs if isinstance(template_kwargs, dict) else {}
    conv = Conversation(messages=messages, reasoning_effort=effort, tools=tools,
                        developer_instructions="\n\n".join(instructions) if instructions else None)
    date = kw.get("current_date")
    if date is not None:
        if not isinstance(date, str):
            raise bad("chat_template_kwargs.current_date must be a YYYY-MM-DD string", "chat_template_kwargs")
        conv.current_date = date
    return conv


# ---- chat completions: the request --------------------------------------------------------------


def chat_request(body: dict) -> GenRequest:
    """A ``POST /v1/chat/completions`` body as a ``GenRequest``; ``ApiError`` 400 otherwise."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    if body.get("n") not in (None, 1):
        raise bad("only n=1 is supported", "n")
    if body.get("logprobs"):
        raise bad("logprobs are not supported", "logprobs")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("only response_format {'type': 'text'} is supported", "response_format")
    instructions, history, calls = [], [], {}
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{param} must be an object", param)
        role = m.get("role")
        if role in ("system", "developer"):
            instructions.append(text_of(m.get("content"), f"{param}.content"))
        elif role == "user":
            history.append(Message("user", text_of(m.get("content"), f"{param}.content")))
        elif role == "assistant":
            history += _assistant(m, param, calls)
        elif role == "tool":
            call_id = m.get("tool_call_id")
            name = calls.get(call_id) or m.get("name")
            if not isinstance(name, str) or not name:
                raise bad(f"{param}: tool_call_id {call_id!r} names no earlier tool call", param)
            history.append(Message.tool_result(f"functions.{name}", text_of(m.get("content"), f"{param}.content")))
        else:
            raise bad(f"{param}: unknown role {role!r}; one of system, developer, user, assistant, tool", param)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    max_tokens = int_field(body, "max_completion_tokens", 1)
    max_tokens = max_tokens if max_tokens is not None else int_field(body, "max_tokens", 1)
    tools = function_tools(body.get("tools"), body.get("tool_choice"), nested=True)
    return GenRequest(
        conversation(history, instructions, effort_field(body.get("reasoning_effort"), "reasoning_effort"), tools,
                     body.get("chat_template_kwargs")),
        max_tokens=max_tokens, temperature=number_field(body, "temperature", 1.0, 0, MAX_TEMPERATURE),
        top_p=number_field(body, "top_p", 1.0, 0, 1, low_open=True), seed=int_field(body, "seed"),
        stop=stops_field(body.get("stop")), stream=bool_field(body, "stream"),
        include_usage=bool(stream_options.get("include_usage")), ignore_eos=bool_field(body, "ignore_eos"))


def _assistant(m: dict, param: str, calls: dict) -> list[Message]:
    out = []
    reasoning = m.get("reasoning_content", m.get("reasoning"))
    if reasoning:
        out.append(Message("assistant", text_of(reasoning, f"{param}.reasoning_content"), channel="analysis"))
    tool_calls = m.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise bad(f"{param}.tool_calls must be a list", param)
    content = text_of(m.get("content"), f"{param}.content")
    if content:
        out.append(Message("assistant", content, channel="commentary" if tool_calls else "final"))
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"{param}.tool_calls[{j}] needs a function with a name", param)
        arguments = fn.get("arguments") or ""
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls[call.get("id")] = fn["name"]
        out.append(call_message(fn["name"], arguments))
    return out


# ---- the reply, as it streams ---------------------------------------------------------------


@dataclass(frozen=True)
class Delta:
    """A piece of the reply: ``kind`` is reasoning | content | tool (a call starts: ``text`` is the
    function name, ``call_id`` its id) | arguments (of tool call ``index``)."""

    kind: str
    text: str
    index: int = 0
    call_id: str = ""


class ReplyBuilder:
    """Feeds generated tokens to the Harmony parser and turns its events into ``Delta``s.

    Stop strings apply to the content: text is held back while it could be the start of one, and
    a match ends the reply there (``stop_hit``). Tokens are counted per channel the way
    ``ChatSession`` counts them (``harmony.ReplyTally``: a header counts with its message)."""

    def __init__(self, encoding, stops: list[str] = ()):
        self.parser = StreamParser(encoding)
        self.tally = ReplyTally()                               # tokens by channel, raw text
        self.stops = list(stops)
        self.reasoning, self.content, self.calls = [], [], []   # calls: {id, name, arguments}
        self.malformed = []
        self.stop_hit = False
        self._call, self._held = None, ""

    @property
    def counts(self) -> dict:
        return self.tally.counts

    @property
    def n_tokens(self) -> int:
        return sum(self.counts.values())

    def feed(self, token_id: int) -> list[Delta]:
        events = self.parser.feed(token_id)
        self.tally.feed(self.parser, events)
        return self._deltas(events)

    def finish(self) -> list[Delta]:
        events = self.parser.finish()
        self.tally.finish(events)
        deltas = self._deltas(events)
        if self._held and not self.stop_hit:
            deltas.append(self._content(self._held))
            self._held = ""
        return deltas

    def _deltas(self, events) -> list[Delta]:
        out = []
        for e in events:
            if isinstance(e, MessageStart):
                if e.role == "assistant" and e.recipient not in (None, "all"):
                    self._call = len(self.calls)
                    call = {"id": new_id("call_"), "name": e.recipient.removeprefix("functions."), "arguments": ""}
                    self.calls.append(call)
                    out.append(Delta("tool", call["name"], self._call, call["id"]))
            elif isinstance(e, MessageEnd):
                self._call = None
            elif isinstance(e, Malformed):
                self.malformed.append(e.reason)
            elif isinstance(e, TextDelta) and not self.stop_hit:
                if self._call is not None:
                    self.calls[self._call]["arguments"] += e.text
                    out.append(Delta("arguments", e.text, self._call))
                elif e.channel == "analysis":
                    self.reasoning.append(e.text)
                    out.append(Delta("reasoning", e.text))
                else:
                    out += self._match_stops(e.text)
        return out

    def _content(self, text: str) -> Delta:
        self.content.append(text)
        return Delta("content", text)

    def _match_stops(self, text: str) -> list[Delta]:
        if not self.stops:
            return [self._content(text)]
        held = self._held + text
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stop_hit, self._held = True, ""
            return [self._content(held[:min(hits)])] if min(hits) > 0 else []
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(held) + 1))
                    if held.endswith(s[:k])), default=0)   # a tail that could start a stop string
        self._held = held[len(held) - keep:] if keep else ""
        emit = held[:len(held) - keep]
        return [self._content(emit)] if emit else []

    def harmony(self, stop_reason: str, prompt_tokens: int) -> dict:
        """The reply as gptoss's parser read it (see the module docstring)."""
        msgs = self.parser.messages
        return {
            "answer": "".join(m.content for m in msgs if m.channel == "final"),
            "reasoning": "".join(m.content for m in msgs if m.channel == "analysis"),
            "tool_calls": [{"recipient": m.recipient, "arguments": m.content, "content_type": m.content_type}
                           for m in msgs if m.role == "assistant" and m.recipient not in (None, "all")],
            "raw": "".join(self.tally.raw), "malformed": list(self.malformed), "stop_reason": stop_reason,
            "tokens": {"prompt": prompt_tokens, "reasoning": self.counts["analysis"],
                       "answer": self.counts["final"], "generated": self.n_tokens},
        }


def finish_reason(stop_reason: str, builder: ReplyBuilder) -> str:
    """OpenAI's finish_reason: tool_calls when the turn ended in a call, length when it ran out."""
    if stop_reason in ("length", "context"):
        return "length"
    return "tool_calls" if builder.calls and not builder.stop_hit else "stop"


def usage(prompt_tokens: int, cached: int, builder: ReplyBuilder) -> dict:
    n = builder.n_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": builder.counts["analysis"]}}


# ---- chat completions: the response ---------------------------------------------------------


def chat_completion(rid: str, model: str, builder: ReplyBuilder, stop_reason: str, prompt_tokens: int,
                    cached: int) -> dict:
    """The non-streaming ``chat.completion`` object."""
    content = "".join(builder.content)
    message = {"role": "assistant", "content": content if content or not builder.calls else None,
               "reasoning_content": "".join(builder.reasoning) or None}
    if builder.calls:
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}} for c in builder.calls]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason(stop_reason, builder)}],
            "usage": usage(prompt_tokens, cached, builder),
            "harmony": builder.harmony(stop_reason, prompt_tokens)}


class ChatChunks:
    """The ``chat.completion.chunk`` objects of one streamed reply."""

    def __init__(self, rid: str, model: str):
        self.rid, self.model, self.created = rid, model, int(time.time())

    def chunk(self, delta: dict, finish: str | None = None, **extra) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}

    def first(self) -> dict:
        return self.chunk({"role": "assistant", "content": ""})

    def of(self, d: Delta) -> dict:
        if d.kind == "reasoning":
            return self.chunk({"reasoning_content": d.text})
        if d.kind == "content":
            return self.chunk({"content": d.text})
        if d.kind == "tool":
            return self.chunk({"tool_calls": [{"index": d.index, "id": d.call_id, "type": "function",
                                               "function": {"name": d.text, "arguments": ""}}]})
        return self.chunk({"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]})

    def last(self, builder: ReplyBuilder, stop_reason: str) -> dict:
        return self.chunk({}, finish_reason(stop_reason, builder))

    def usage(self, builder: ReplyBuilder, stop_reason: str, prompt_tokens: int, cached: int) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(prompt_tokens, cached, builder),
                "harmony": builder.harmony(stop_reason, prompt_tokens)}


def sse(obj) -> bytes:
    """One server-sent event carrying ``obj`` as JSON (``[DONE]`` as is)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()

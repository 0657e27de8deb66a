"""The OpenAI wire formats of ``gptoss serve``: requests into Harmony, the model's output back out.

This module knows JSON and Harmony, never the engine or the network: ``serve_worker.py`` runs the
model and ``serve.py`` the HTTP server; this turns a request body into a ``GenRequest`` (a Harmony
``Conversation`` plus sampling settings, fields checked by ``serve_params.py``) and the parsed
output into Chat Completions objects and chunks (``serve_responses.py`` does the same for the
Responses API, ``serve_completions.py`` for raw completions). With ``logprobs``, the content's
tokens carry their log-probabilities (``logprobs.content``), as OpenAI's chat API reports them.

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
from dataclasses import dataclass, field, replace

from .harmony import (CALL_ID, EFFORTS, END_ID, RETURN_ID, Conversation, FunctionTool, Malformed, Message, MessageEnd,
                      MessageStart, ReplyTally, StreamParser, TextDelta)
from .sampling import SamplingParams, Step
from .serve_params import (ApiError, ToolChoice, bad, bool_field, chat_logprobs_field, int_field,  # noqa: F401
                           n_field, new_id, number_field, refuse_unsupported, sampling_fields, stops_field,
                           tool_choice_field)

CHAT_REFUSED = ("store", "audio", "modalities", "prediction", "web_search_options", "min_tokens", "best_of",
                "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


@dataclass
class GenRequest:
    """What to generate, whichever API asked: the conversation (None for completions, whose
    prompts are token ids already) and how to sample the reply."""

    conversation: Conversation | None = None
    max_tokens: int | None = None     # None: as many as the context has room for
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False          # vLLM's and SGLang's extension, for benchmarks
    n: int = 1                        # choices per prompt
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    echo: bool = False                # completions: the prompt comes back before the completion
    skip_special_tokens: bool = True  # completions: special tokens are left out of the text
    tokens_as_ids: bool = False       # completions: logprobs name tokens token_id:N (vLLM's)


def effort_field(value, param: str) -> str:
    if value is None:
        return "medium"
    if value not in EFFORTS:
        raise bad(f"'{param}' must be one of {', '.join(EFFORTS)}; got {value!r}", param)
    return value


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


def function_tools(tools, tool_choice, nested: bool) -> tuple[list[FunctionTool], ToolChoice]:
    """``tools`` of type function (chat: ``{"function": {...}}``; responses: flat) as Harmony
    tools, and ``tool_choice``; with ``none`` no tool is declared."""
    if tools is None:
        tools = []
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
    choice = tool_choice_field(tool_choice, [t.name for t in out], nested)
    return ([] if choice.mode == "none" else out), choice


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


def chat_request(body: dict, vocab_size: int) -> GenRequest:
    """A ``POST /v1/chat/completions`` body as a ``GenRequest``; ``ApiError`` 400 otherwise."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    refuse_unsupported(body, CHAT_REFUSED)
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
    tools, choice = function_tools(body.get("tools"), body.get("tool_choice"), nested=True)
    return GenRequest(
        conversation(history, instructions, effort_field(body.get("reasoning_effort"), "reasoning_effort"), tools,
                     body.get("chat_template_kwargs")),
        max_tokens=max_tokens, sampling=sampling_fields(body, vocab_size, chat_logprobs_field(body)),
        seed=int_field(body, "seed"), stop=stops_field(body.get("stop")), stream=bool_field(body, "stream"),
        include_usage=bool(stream_options.get("include_usage")), ignore_eos=bool_field(body, "ignore_eos"),
        n=n_field(body), tool_choice=choice)


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
    function name, ``call_id`` its id) | arguments (of tool call ``index``); ``choice`` is the
    choice it belongs to; ``logprobs``: the entries of the tokens it carries, when asked for."""

    kind: str
    text: str
    index: int = 0
    call_id: str = ""
    choice: int = 0
    logprobs: tuple = ()


@dataclass(frozen=True)
class Done:
    """One choice is complete: its builder holds the reply."""

    builder: object                   # ReplyBuilder, or serve_completions.TextBuilder
    stop_reason: str                  # stop | length | context | cancelled
    prompt_tokens: int
    cached_tokens: int
    choice: int = 0


def token_text(encoding, token_id: int) -> tuple[str, bytes]:
    """A token as OpenAI shows it in logprobs: its text, or ``bytes:\\xNN...`` when its bytes are
    not whole UTF-8 characters; and the bytes."""
    raw = encoding.decode_single_token_bytes(token_id)
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


def logprob_entry(encoding, token_id: int, logprob: float, top) -> dict:
    """Chat's entry for one token: ``{token, logprob, bytes, top_logprobs}``."""
    def one(tok, lp):
        text, raw = token_text(encoding, tok)
        return {"token": text, "logprob": lp, "bytes": list(raw)}
    return {**one(token_id, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}


class StopMatcher:
    """Stop strings over streamed text: text is held back while it could be the start of one, and
    a match ends the text there (``hit``)."""

    def __init__(self, stops):
        self.stops, self.hit, self.held = list(stops), False, ""

    def feed(self, text: str) -> str:
        """The text that may go out now."""
        if not self.stops:
            return text
        held = self.held + text
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.hit, self.held = True, ""
            return held[:min(hits)]
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(held) + 1))
                    if held.endswith(s[:k])), default=0)   # a tail that could start a stop string
        self.held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep]

    def flush(self) -> str:
        text, self.held = ("" if self.hit else self.held), ""
        return text


class ReplyBuilder:
    """Feeds generated tokens to the Harmony parser and turns its events into ``Delta``s.

    Stop strings apply to the content (``StopMatcher``; a match sets ``stop_hit``). Tokens are
    counted per channel the way ``ChatSession`` counts them (``harmony.ReplyTally``: a header counts
    with its message). Log-probabilities, when the sampler gives them, are kept for the content's
    tokens (the final channel's, as OpenAI's chat API reports them) and ride on the content deltas."""

    def __init__(self, encoding, stops: list[str] = (), choice: int = 0):
        self.parser = StreamParser(encoding)
        self.encoding, self.choice = encoding, choice
        self.tally = ReplyTally()                               # tokens by channel, raw text
        self.reasoning, self.content, self.calls = [], [], []   # calls: {id, name, arguments}
        self.malformed = []
        self.content_logprobs: list[dict] = []
        self._stops = StopMatcher(stops)
        self._call, self._pending = None, []

    @property
    def counts(self) -> dict:
        return self.tally.counts

    @property
    def stop_hit(self) -> bool:
        return self._stops.hit

    @property
    def n_tokens(self) -> int:
        return sum(self.counts.values())

    def feed(self, token_id: int, step: Step | None = None) -> list[Delta]:
        at = self.parser.current
        if (step is not None and step.logprob is not None and not self.stop_hit and at is not None
                and at.role == "assistant" and at.recipient in (None, "all") and at.channel != "analysis"
                and token_id not in (END_ID, RETURN_ID, CALL_ID)):
            self._pending.append(logprob_entry(self.encoding, token_id, step.logprob, step.top))
        events = self.parser.feed(token_id)
        self.tally.feed(self.parser, events)
        return self._with_logprobs(self._deltas(events))

    def finish(self) -> list[Delta]:
        events = self.parser.finish()
        self.tally.finish(events)
        deltas = self._deltas(events)
        if tail := self._stops.flush():
            deltas.append(self._content(tail))
        deltas = self._with_logprobs(deltas)
        if self._pending and not self.stop_hit:     # tokens whose text never came out on its own
            deltas.append(Delta("content", "", choice=self.choice, logprobs=tuple(self._pending)))
            self.content_logprobs += self._pending
        self._pending = []
        return deltas

    def _with_logprobs(self, deltas: list[Delta]) -> list[Delta]:
        if self._pending:
            for i, d in enumerate(deltas):
                if d.kind == "content":
                    deltas[i] = replace(d, logprobs=tuple(self._pending))
                    self.content_logprobs += self._pending
                    self._pending = []
                    break
        return deltas

    def _deltas(self, events) -> list[Delta]:
        out, c = [], self.choice
        for e in events:
            if isinstance(e, MessageStart):
                if e.role == "assistant" and e.recipient not in (None, "all"):
                    self._call = len(self.calls)
                    call = {"id": new_id("call_"), "name": e.recipient.removeprefix("functions."), "arguments": ""}
                    self.calls.append(call)
                    out.append(Delta("tool", call["name"], self._call, call["id"], choice=c))
            elif isinstance(e, MessageEnd):
                self._call = None
            elif isinstance(e, Malformed):
                self.malformed.append(e.reason)
            elif isinstance(e, TextDelta) and not self.stop_hit:
                if self._call is not None:
                    self.calls[self._call]["arguments"] += e.text
                    out.append(Delta("arguments", e.text, self._call, choice=c))
                elif e.channel == "analysis":
                    self.reasoning.append(e.text)
                    out.append(Delta("reasoning", e.text, choice=c))
                elif text := self._stops.feed(e.text):
                    out.append(self._content(text))
        return out

    def _content(self, text: str) -> Delta:
        self.content.append(text)
        return Delta("content", text, choice=self.choice)

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


def usage(dones: list[Done]) -> dict:
    """Usage over a request's choices: the prompt counted once, the completions summed."""
    first = dones[0]
    n = sum(d.builder.n_tokens for d in dones)
    out = {"prompt_tokens": first.prompt_tokens, "completion_tokens": n, "total_tokens": first.prompt_tokens + n,
           "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}
    if isinstance(first.builder, ReplyBuilder):
        out["completion_tokens_details"] = {"reasoning_tokens": sum(d.builder.counts["analysis"] for d in dones)}
    return out


# ---- chat completions: the response ---------------------------------------------------------


def chat_completion(rid: str, model: str, dones: list[Done], logprobs: bool = False) -> dict:
    """The non-streaming ``chat.completion`` object (one choice per ``Done``)."""
    choices = []
    for d in dones:
        b = d.builder
        content = "".join(b.content)
        message = {"role": "assistant", "content": content if content or not b.calls else None,
                   "reasoning_content": "".join(b.reasoning) or None}
        if b.calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}} for c in b.calls]
        choices.append({"index": d.choice, "message": message,
                        "logprobs": {"content": b.content_logprobs, "refusal": None} if logprobs else None,
                        "finish_reason": finish_reason(d.stop_reason, b)})
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(dones),
            "harmony": dones[0].builder.harmony(dones[0].stop_reason, dones[0].prompt_tokens)}


class ChatChunks:
    """The ``chat.completion.chunk`` objects of one streamed reply."""

    def __init__(self, rid: str, model: str):
        self.rid, self.model, self.created = rid, model, int(time.time())

    def chunk(self, delta: dict, finish: str | None = None, choice: int = 0, logprobs=None) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    def first(self, choice: int = 0) -> dict:
        return self.chunk({"role": "assistant", "content": ""}, choice=choice)

    def of(self, d: Delta) -> dict:
        c = d.choice
        if d.kind == "reasoning":
            return self.chunk({"reasoning_content": d.text}, choice=c)
        if d.kind == "content":
            logprobs = {"content": list(d.logprobs), "refusal": None} if d.logprobs else None
            return self.chunk({"content": d.text}, choice=c, logprobs=logprobs)
        if d.kind == "tool":
            return self.chunk({"tool_calls": [{"index": d.index, "id": d.call_id, "type": "function",
                                               "function": {"name": d.text, "arguments": ""}}]}, choice=c)
        return self.chunk({"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]}, choice=c)

    def last(self, done: Done) -> dict:
        return self.chunk({}, finish_reason(done.stop_reason, done.builder), choice=done.choice)

    def usage(self, dones: list[Done]) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(dones),
                "harmony": dones[0].builder.harmony(dones[0].stop_reason, dones[0].prompt_tokens)}


# characters that Python's str.splitlines (and so httpx's iter_lines, which many clients read SSE
# with) takes for line ends, and that json.dumps leaves raw: escaped, an event stays one line
_LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(obj) -> bytes:
    """One server-sent event carrying ``obj`` as JSON (``[DONE]`` as is)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKERS)
    return f"data: {data}\n\n".encode()

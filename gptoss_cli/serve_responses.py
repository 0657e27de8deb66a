"""The Responses API of ``gptoss serve`` (``POST /v1/responses``): input items into Harmony, the
reply out as output items and, when streamed, as typed server-sent events.

This is the API OpenAI's own gpt-oss reference server speaks. Input items: messages (a string
``input`` is one user message; ``instructions`` and system/developer messages become Harmony's
developer instructions), ``function_call`` and ``function_call_output`` items (a call and its
result, matched by ``call_id``), ``reasoning`` items (earlier analysis). Output items, in the order
the model produced them: ``reasoning`` (its analysis as ``reasoning_text``), ``message`` (the final
channel as ``output_text``), ``function_call``. The server is stateless: ``previous_response_id``
is refused, the client resends the conversation (and the engine's prefix reuse makes that cheap).
A stream that cannot finish (generation failed, the server is shutting down) ends with
``response.failed``, whose response carries the error, as the Responses streaming spec has it.
"""

from __future__ import annotations

import json
import time

from . import serve_api as api
from .harmony import Message
from .serve_api import Delta, GenRequest, bad, new_id
from .serve_params import ApiError, refuse_unsupported, sampling_fields


RESPONSES_REFUSED = ("previous_response_id", "conversation", "store", "background", "prompt", "include",
                     "truncation", "top_logprobs")


def responses_request(body: dict, vocab_size: int) -> GenRequest:
    """A ``POST /v1/responses`` body as a ``GenRequest``; ``ApiError`` 400 otherwise."""
    refuse_unsupported(body, RESPONSES_REFUSED)
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt is not None and fmt.get("type") != "text":
        raise bad("only text output is supported (text.format {'type': 'text'})", "text")
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad("'input' must be a string or a non-empty list of items", "input")
    instructions = [body["instructions"]] if isinstance(body.get("instructions"), str) else []
    history, calls = [], {}
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{param} must be an object", param)
        kind = item.get("type", "message")
        if kind == "message":
            role, text = item.get("role"), api.text_of(item.get("content"), f"{param}.content")
            if role in ("system", "developer"):
                instructions.append(text)
            elif role in ("user", "assistant"):
                history.append(Message(role, text, channel="final" if role == "assistant" else None))
            else:
                raise bad(f"{param}: unknown role {role!r}; one of system, developer, user, assistant", param)
        elif kind == "function_call":
            name, arguments = item.get("name"), item.get("arguments") or ""
            if not isinstance(name, str) or not name or not isinstance(arguments, str):
                raise bad(f"{param}: a function_call needs a name and arguments (a JSON string)", param)
            calls[item.get("call_id")] = name
            history.append(api.call_message(name, arguments))
        elif kind == "function_call_output":
            name = calls.get(item.get("call_id"))
            if name is None:
                raise bad(f"{param}: call_id {item.get('call_id')!r} names no function_call before it", param)
            output = item.get("output")
            history.append(Message.tool_result(f"functions.{name}", output if isinstance(output, str) else json.dumps(output)))
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
            history.append(Message("assistant", text, channel="analysis"))
        else:
            raise bad(f"{param}: items of type {kind!r} are not supported", param)
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    tools, choice = api.function_tools(body.get("tools"), body.get("tool_choice"), nested=False)
    return GenRequest(
        api.conversation(history, instructions, api.effort_field(reasoning.get("effort"), "reasoning.effort"), tools,
                         body.get("chat_template_kwargs")),
        max_tokens=api.int_field(body, "max_output_tokens", 1), sampling=sampling_fields(body, vocab_size),
        seed=api.int_field(body, "seed"), stream=api.bool_field(body, "stream"),
        ignore_eos=api.bool_field(body, "ignore_eos"), tool_choice=choice)


_PART = {"reasoning": "reasoning_text", "content": "output_text"}
_DELTA = {"reasoning": "response.reasoning_text.delta", "content": "response.output_text.delta",
          "arguments": "response.function_call_arguments.delta"}


class ResponseEvents:
    """Builds one response from the reply's deltas: its output items and, for a stream, the typed
    events (``sequence_number`` counts them from 0). ``response`` is the object so far."""

    def __init__(self, rid: str, model: str, body: dict, prompt_tokens: int):
        self.seq = 0
        self.item: dict | None = None        # the output item being written
        reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
        self.response = {
            "id": rid, "object": "response", "created_at": int(time.time()), "model": model,
            "status": "in_progress", "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "output": [], "parallel_tool_calls": True,
            "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
            "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
            "max_output_tokens": body.get("max_output_tokens"),
            "reasoning": {"effort": reasoning.get("effort") or "medium", "summary": None},
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": {}, "usage": None,
            "store": False, "background": False,
        }
        self.prompt_tokens = prompt_tokens

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def start(self) -> list[dict]:
        return [self._event("response.created", response=dict(self.response)),
                self._event("response.in_progress", response=dict(self.response))]

    def add(self, d: Delta) -> list[dict]:
        events = []
        wanted = "function_call" if d.kind in ("tool", "arguments") else d.kind
        if self.item is None or d.kind == "tool" or self.item["_kind"] != wanted:
            events += self._close()
            events += self._open(d)
        item, index = self.item, len(self.response["output"]) - 1
        if d.kind == "tool":
            return events
        if d.kind == "arguments":
            item["arguments"] += d.text
            return events + [self._event(_DELTA[d.kind], item_id=item["id"], output_index=index, delta=d.text)]
        item["content"][0]["text"] += d.text
        extra = {"logprobs": []} if d.kind == "content" else {}
        return events + [self._event(_DELTA[d.kind], item_id=item["id"], output_index=index, content_index=0,
                                     delta=d.text, **extra)]

    def _open(self, d: Delta) -> list[dict]:
        if d.kind in ("tool", "arguments"):
            item = {"type": "function_call", "id": new_id("fc_"), "call_id": d.call_id or new_id("call_"),
                    "name": d.text if d.kind == "tool" else "", "arguments": "", "status": "in_progress"}
            kind = "function_call"
        elif d.kind == "reasoning":
            item = {"type": "reasoning", "id": new_id("rs_"), "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
            kind = "reasoning"
        else:
            item = {"type": "message", "id": new_id("msg_"), "role": "assistant", "status": "in_progress",
                    "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
            kind = "content"
        self.response["output"].append(item)
        index = len(self.response["output"]) - 1
        events = [self._event("response.output_item.added", output_index=index, item=_public(item, empty=True))]
        if kind != "function_call":
            events.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                      content_index=0, part={**item["content"][0], "text": ""}))
        item["_kind"] = kind
        self.item = item
        return events

    def _close(self, status: str = "completed") -> list[dict]:
        item, self.item = self.item, None
        if item is None:
            return []
        index = len(self.response["output"]) - 1
        item["status"] = status
        events = []
        if item["_kind"] == "function_call":
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, arguments=item["arguments"]))
        else:
            part = item["content"][0]
            done = "response.reasoning_text.done" if item["_kind"] == "reasoning" else "response.output_text.done"
            extra = {"logprobs": []} if item["_kind"] == "content" else {}
            events.append(self._event(done, item_id=item["id"], output_index=index, content_index=0, text=part["text"],
                                      **extra))
            events.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                      content_index=0, part=part))
        del item["_kind"]
        return events + [self._event("response.output_item.done", output_index=index, item=item)]

    def finish(self, done) -> list[dict]:
        """Close the last item; the final response (status, usage) and its completed event."""
        events = self._close()
        b, r = done.builder, self.response
        incomplete = done.stop_reason in ("length", "context")
        r["status"] = "incomplete" if incomplete else "completed"
        r["incomplete_details"] = {"reason": "max_output_tokens"} if incomplete else None
        n = b.n_tokens
        r["usage"] = {"input_tokens": done.prompt_tokens, "input_tokens_details": {"cached_tokens": done.cached_tokens,
                                                                 "cache_write_tokens": done.prompt_tokens - done.cached_tokens},
                      "output_tokens": n, "output_tokens_details": {"reasoning_tokens": b.counts["analysis"]},
                      "total_tokens": done.prompt_tokens + n}
        r["harmony"] = b.harmony(done.stop_reason, done.prompt_tokens)
        kind = "response.incomplete" if incomplete else "response.completed"
        return events + [self._event(kind, response=r)]

    def fail(self, error: ApiError) -> list[dict]:
        """The stream's end when generation failed or the server is shutting down: the item being
        written is closed as it stands (incomplete), then ``response.failed`` (with the error)."""
        events = self._close("incomplete")
        r = self.response
        r["status"] = "failed"
        r["error"] = {"code": "server_error", "message": error.message}     # the spec's code for ours
        return events + [self._event("response.failed", response=r)]


def _public(item: dict, empty: bool = False) -> dict:
    """An output item as sent: without our bookkeeping key; as just opened when ``empty``."""
    out = {k: v for k, v in item.items() if k != "_kind"}
    if empty and "content" in out:
        out["content"] = []
    return out

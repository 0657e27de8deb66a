"""Making the model call a function: ``tool_choice`` "required" or a named function, enforced on the
Harmony headers the model writes.

gpt-oss says what a message is in its header: ``<|channel|>analysis<|message|>`` opens its
reasoning, ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>`` a call,
``<|channel|>final<|message|>`` the answer. ``ToolCallConstraint`` is a token mask for the engine's
sampler (``sampling.TokenMask``) that lets the model reason as it likes but only ever open one of
those call headers (of the allowed functions) after it, and end the call with ``<|call|>``:

- at a header, only the tokens that continue the analysis header or one of the call headers;
- inside the analysis, anything but ``<|return|>`` and ``<|call|>`` (it ends with ``<|end|>``),
  after which ``<|start|>assistant`` comes next;
- inside the call's arguments, anything but ``<|end|>`` and ``<|return|>``.

Everything else stays the model's choice: which function (for "required"), when to stop
reasoning, the arguments. The headers are those OpenAI's gpt-oss guide shows the model writing
(recipient after the channel), tokenized as the renderer tokenizes header pieces.
"""

from __future__ import annotations

import tiktoken

from .harmony import CALL_ID, CHANNEL_ID, CONSTRAIN_ID, END_ID, MESSAGE_ID, RETURN_ID, START_ID
from .sampling import TokenMask


class ToolCallConstraint:
    """The mask of the next token, given the tokens generated so far (called once per token, in
    order, by the sampler); the reply starts after ``<|start|>assistant``."""

    def __init__(self, encoding: tiktoken.Encoding, names: list[str]):
        if not names:
            raise ValueError("a tool call constraint needs at least one function")
        text = encoding.encode_ordinary
        self.analysis = (CHANNEL_ID, *text("analysis"), MESSAGE_ID)
        self.calls = [(CHANNEL_ID, *text("commentary"), *text(f" to=functions.{name}"), *text(" "), CONSTRAIN_ID,
                       *text("json"), MESSAGE_ID) for name in names]
        self.role = (START_ID, *text("assistant"))
        self.state, self.prefix, self.seen = "header", (), 0

    def __call__(self, generated: list[int]) -> TokenMask | None:
        for tok in generated[self.seen:]:
            self._advance(tok)
        self.seen = len(generated)
        if self.state == "header":
            return TokenMask(sorted(self._continuations(self.prefix)), True)
        if self.state == "role":
            return TokenMask([self.role[len(self.prefix)]], True)
        if self.state == "analysis":
            return TokenMask([RETURN_ID, CALL_ID], False)
        if self.state == "call":
            return TokenMask([END_ID, RETURN_ID], False)
        return None                                   # done: the call ended

    def _continuations(self, prefix: tuple) -> set[int]:
        n = len(prefix)
        return {h[n] for h in (self.analysis, *self.calls) if h[:n] == prefix and len(h) > n}

    def _advance(self, tok: int) -> None:
        if self.state in ("header", "role"):
            self.prefix += (tok,)
            if self.state == "role" and self.prefix == self.role:
                self.state, self.prefix = "header", ()
            elif self.state == "header" and self.prefix == self.analysis:
                self.state, self.prefix = "analysis", ()
            elif self.state == "header" and self.prefix in self.calls:
                self.state, self.prefix = "call", ()
        elif self.state == "analysis" and tok == END_ID:
            self.state, self.prefix = "role", ()
        elif self.state == "call" and tok == CALL_ID:
            self.state = "done"

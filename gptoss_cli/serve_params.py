"""Checking the fields of a request to ``gptoss serve``: each bad value is a 400 that names it.

Shared by the three generation APIs (``serve_api.py`` chat, ``serve_responses.py``,
``serve_completions.py``): the numbers, the sampling parameters (which the engine's sampler
honours, ``sampling.py``), ``tool_choice``, and the fields this server cannot honour. Those are
refused rather than ignored: a client that asks for ``n=3`` candidates or a stored response and
gets something else has been misled. Fields that change nothing a client can observe (``user``,
``metadata``, ``parallel_tool_calls``, ...) are accepted.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from .config import MAX_TEMPERATURE
from .sampling import MAX_TOP_LOGPROBS, SamplingParams

MAX_STOPS = 4
MAX_N = 16
MAX_LOGIT_BIAS = 300       # entries, as OpenAI allows


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


# ---- single fields ------------------------------------------------------------------------------


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


def stops_field(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"'stop' takes at most {MAX_STOPS} strings", "stop")
    return stops


# ---- sampling ---------------------------------------------------------------------------------


def logit_bias_field(value, vocab_size: int) -> dict[int, float]:
    """``{"token id": bias}`` (ids as strings, as JSON keys are), each bias in [-100, 100]."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("'logit_bias' must map token ids to numbers", "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} tokens", "logit_bias")
    out = {}
    for key, bias in value.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise bad(f"logit_bias: {key!r} is not a token id", "logit_bias") from None
        if not 0 <= tok < vocab_size:
            raise bad(f"logit_bias: token id {tok} is outside the vocabulary (0..{vocab_size - 1})", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise bad(f"logit_bias: the bias of token {tok} must be a number in -100..100", "logit_bias")
        out[tok] = float(bias)
    return out


def sampling_fields(body: dict, vocab_size: int, logprobs: int | None = None) -> SamplingParams:
    """The sampling parameters every generation API takes, checked (vLLM's ranges for its
    extensions: ``top_k`` -1 or 0 is off, ``repetition_penalty`` in (0, 2])."""
    top_k = int_field(body, "top_k", -1, vocab_size)
    return SamplingParams(
        temperature=number_field(body, "temperature", 1.0, 0, MAX_TEMPERATURE),
        top_p=number_field(body, "top_p", 1.0, 0, 1, low_open=True),
        top_k=max(top_k or 0, 0),
        min_p=number_field(body, "min_p", 0.0, 0, 1),
        presence_penalty=number_field(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=number_field(body, "frequency_penalty", 0.0, -2, 2),
        repetition_penalty=number_field(body, "repetition_penalty", 1.0, 0, 2, low_open=True),
        logit_bias=logit_bias_field(body.get("logit_bias"), vocab_size),
        logprobs=logprobs,
    )


def chat_logprobs_field(body: dict) -> int | None:
    """Chat's ``logprobs`` (bool) and ``top_logprobs`` (0..20, needs logprobs) as a count, or None."""
    wanted = bool_field(body, "logprobs")
    top = int_field(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def n_field(body: dict) -> int:
    n = int_field(body, "n", 1, MAX_N)
    return 1 if n is None else n


# ---- what this server cannot do ---------------------------------------------------------------

# field -> (values that ask for nothing, why it is refused otherwise)
_REFUSED = {
    "store": ((None, False), "this server keeps no state; send store: false or leave it out"),
    "background": ((None, False), "background responses need stored state, which this server does not keep"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "previous_response_id": ((None,), "this server keeps no state: send the whole input"),
    "conversation": ((None,), "this server keeps no state: send the whole input"),
    "prompt": ((None,), "stored prompt templates are not supported"),
    "include": ((None, []), "no additional output data (include) is supported"),
    "truncation": ((None, "disabled"), "only truncation 'disabled' is supported"),
    "top_logprobs": ((None, 0), "logprobs are supported on /v1/chat/completions and /v1/completions"),
    "best_of": ((None, 1), "best_of is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "min_tokens": ((None, 0), "min_tokens is not supported"),
    "guided_json": ((None,), "guided decoding is not supported"),
    "guided_regex": ((None,), "guided decoding is not supported"),
    "guided_choice": ((None,), "guided decoding is not supported"),
    "guided_grammar": ((None,), "guided decoding is not supported"),
    "structured_outputs": ((None,), "structured outputs are not supported"),
}


def refuse_unsupported(body: dict, fields: tuple[str, ...]) -> None:
    """A 400 naming the first of ``fields`` that asks for what this server cannot do."""
    for key in fields:
        allowed, why = _REFUSED[key]
        if key in body and not any(body[key] == a and type(body[key]) is type(a) for a in allowed):
            raise bad(f"'{key}' is not supported: {why}", key)


# ---- tool_choice ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolChoice:
    """What the reply must do: ``mode`` none | auto | required; ``name``: the one function it must
    call (``required`` with a name)."""

    mode: str = "auto"
    name: str | None = None


def tool_choice_field(value, tool_names: list[str], nested: bool) -> ToolChoice:
    """``tool_choice``: none, auto, required, or one function (chat: ``{"type": "function",
    "function": {"name": ...}}``; responses: ``{"type": "function", "name": ...}``)."""
    if value is None or value == "auto":
        return ToolChoice("auto")
    if value == "none":
        return ToolChoice("none")
    if value == "required":
        if not tool_names:
            raise bad("tool_choice 'required' needs at least one function in 'tools'", "tool_choice")
        return ToolChoice("required")
    if isinstance(value, dict) and value.get("type") == "function":
        spec = value.get("function") if nested else value
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name:
            raise bad("tool_choice: a function choice needs the function's name", "tool_choice")
        if name not in tool_names:
            raise bad(f"tool_choice names {name!r}, which is not in 'tools'", "tool_choice")
        return ToolChoice("required", name)
    raise bad("'tool_choice' must be none, auto, required or a function", "tool_choice")

"""A client of any OpenAI-compatible server (``gptoss serve``, vLLM, SGLang, ollama): what
``gptoss eval --endpoint`` and ``gptoss bench --endpoint`` use instead of an in-process engine.

It speaks plain HTTP with httpx (``POST /v1/chat/completions``, server-sent events for streams,
``GET /v1/models``), so the product needs no SDK. Failures are one line: a server that cannot be
reached, an API key it refuses, a model it does not serve, an error object it returns.

Eval over an endpoint sends each problem as the in-process eval renders it: developer
instructions as a developer message, the suite's function tools, ``reasoning_effort``, the seed,
and the eval's fixed date in ``chat_template_kwargs.current_date`` (vLLM's field for template
settings; a server that ignores it uses its own date). The reply is read from the standard fields
(``content``, ``reasoning_content`` or ``reasoning``, ``tool_calls``), or, from ``gptoss serve``,
from its ``harmony`` field: the parse the in-process eval grades, so the two reports agree.
"""

from __future__ import annotations

import json
import time
from typing import Iterable, Iterator
from urllib.parse import urlsplit

from .errors import GptossError
from .records import context_record, graded_record

TIMEOUT_S = 3600.0   # per read: a non-streaming reply of thousands of tokens on a slow server


class EndpointError(GptossError):
    """The server answered with an error object (``status``: the HTTP status, ``code`` its code,
    ``retry_after``: seconds its Retry-After header asks for, if any)."""

    def __init__(self, message: str, status: int, code: str | None = None, hint: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message, hint)
        self.status, self.code, self.retry_after = status, code, retry_after


def sse_data(chunks: Iterable[bytes]) -> Iterator[str]:
    """The data of each server-sent event in a stream of bytes (the SSE spec's parsing, for the
    ``data`` field). Lines end at LF or CRLF only: httpx's ``iter_lines`` splits as
    ``str.splitlines`` does, also at U+2028, U+2029, U+0085 and others, which JSON carries raw
    inside strings, so a chunk holding one would be cut in two. Bytes are split before they are
    decoded, so a character split across network reads stays whole."""
    buffer, data = b"", []
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8")
            if not line:                       # a blank line ends the event
                if data:
                    yield "\n".join(data)
                data = []
            elif line.startswith("data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(" ") else value)
    tail = buffer.removesuffix(b"\r").decode("utf-8")
    if tail.startswith("data:"):
        data.append(tail[5:].removeprefix(" "))
    if data:                                   # a stream cut short still gives what it held
        yield "\n".join(data)


def retry_after(value: str | None) -> float | None:
    """A Retry-After header's delay in seconds (the delta-seconds form; an HTTP date is not used
    by any server we talk to, and reads as None)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def base_url(url: str) -> str:
    """``http://host:port`` or ``.../v1``: the API root, ending in ``/v1`` unless a path is given."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise GptossError(f"--endpoint {url!r} is not an http(s) URL", "e.g. --endpoint http://127.0.0.1:8000/v1")
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path or '/v1'}"


class Endpoint:
    """One OpenAI-compatible server and the model on it that we talk to."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = TIMEOUT_S):
        import httpx

        self.url = base_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._httpx = httpx
        self.client = httpx.Client(base_url=self.url, headers=headers,
                                   timeout=httpx.Timeout(timeout, connect=10.0))
        self.info = self._pick_model(model)
        self.model = self.info["id"]

    # -- requests ----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw):
        try:
            response = self.client.request(method, path, **kw)
        except self._httpx.TransportError as e:
            raise GptossError(f"cannot reach {self.url}: {e or type(e).__name__}",
                              "is the server running? start one with: gptoss serve") from None
        if response.status_code >= 400:
            raise self._error(response)
        return response

    def _error(self, response) -> EndpointError:
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            error = None
        if isinstance(error, dict):
            message, code = str(error.get("message") or error), error.get("code")
        else:
            message, code = (response.text or response.reason_phrase).strip()[:300], None
        hint = "pass --api-key (the server's key)" if response.status_code == 401 else None
        return EndpointError(f"{self.url} answered {response.status_code}: {message}", response.status_code,
                             code, hint, retry_after(response.headers.get("retry-after")))

    def _pick_model(self, name: str | None) -> dict:
        models = self._request("GET", "/models").json().get("data") or []
        ids = [m.get("id") for m in models if isinstance(m, dict)]
        if name is not None:
            if name not in ids:
                raise GptossError(f"{self.url} does not serve {name!r}", f"it serves: {', '.join(map(str, ids)) or 'nothing'}")
            return next(m for m in models if m.get("id") == name)
        if len(ids) != 1:
            raise GptossError(f"{self.url} serves {len(ids)} models: {', '.join(map(str, ids)) or 'none'}",
                              "pick one with --served-model NAME")
        return models[0]

    def chat(self, body: dict) -> dict:
        """One non-streaming chat completion."""
        return self._request("POST", "/chat/completions", json={"model": self.model, **body}).json()

    def stream_chat(self, body: dict) -> Iterator[tuple[float, dict]]:
        """A streamed chat completion: (perf_counter time of arrival, chunk) per server-sent event."""
        payload = {"model": self.model, **body, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with self.client.stream("POST", "/chat/completions", json=payload) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._error(response)
                for data in sse_data(response.iter_bytes()):
                    if data.strip() == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError as e:
                        raise GptossError(f"{self.url} sent an event that is not JSON ({e}): {data[:200]!r}") from None
                    if "error" in chunk:
                        raise EndpointError(f"{self.url} failed mid-stream: {chunk['error'].get('message')}", 500)
                    yield time.perf_counter(), chunk
        except self._httpx.TransportError as e:
            raise GptossError(f"lost the connection to {self.url}: {e or type(e).__name__}") from None

    def runtime_info(self) -> dict:
        """What an eval report says it measured: the endpoint and its model (plus what the server
        tells of itself: gptoss serve reports device, dtype and random weights)."""
        i = self.info
        return {"endpoint": self.url, "model": self.model, "device": f"endpoint:{i.get('device', 'unknown')}",
                "dtype": i.get("dtype", "unknown"), "ops": i.get("ops", "unknown"),
                "max_model_len": i.get("max_model_len"), "random_weights": bool(i.get("random_weights", False))}

    def close(self) -> None:
        self.client.close()


# ---- gptoss eval against an endpoint --------------------------------------------------------


def chat_body(problem, effort: str, seed: int, temperature: float, max_tokens: int, date: str) -> dict:
    """The request for one eval sample: what the in-process eval renders, in API fields."""
    messages = [{"role": "developer", "content": problem.developer}] if problem.developer is not None else []
    messages.append({"role": "user", "content": problem.prompt})
    body = {"messages": messages, "reasoning_effort": effort, "seed": seed, "temperature": temperature,
            "max_tokens": max_tokens, "chat_template_kwargs": {"current_date": date}}
    if problem.tools:
        body["tools"] = [{"type": "function", "function": t} for t in problem.tools]
    return body


def reply_of(response: dict) -> tuple[dict, dict]:
    """(reply fields, token counts) of a chat completion: its ``harmony`` parse when the server
    gives one, else the standard fields."""
    if isinstance(response.get("harmony"), dict):
        h = response["harmony"]
        keys = ("answer", "reasoning", "tool_calls", "raw", "malformed", "stop_reason")
        return {k: h[k] for k in keys}, dict(h["tokens"])
    choice = (response.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    calls = [{"recipient": f"functions.{c['function']['name']}", "arguments": c["function"].get("arguments") or "",
              "content_type": None} for c in message.get("tool_calls") or []]
    finish = choice.get("finish_reason")
    use = response.get("usage") or {}
    generated = use.get("completion_tokens", 0)
    reasoning = (use.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    fields = {"answer": message.get("content") or "",
              "reasoning": message.get("reasoning_content") or message.get("reasoning") or "",
              "tool_calls": calls, "raw": "", "malformed": [], "stop_reason": "length" if finish == "length" else "stop"}
    return fields, {"prompt": use.get("prompt_tokens", 0), "reasoning": reasoning,
                    "answer": generated - reasoning, "generated": generated}


class EvalTarget:
    """``gptoss eval``'s stand-in for the engine when it runs against an endpoint."""

    def __init__(self, endpoint: Endpoint, date: str):
        self.endpoint, self.date = endpoint, date

    def runtime_info(self) -> dict:
        return self.endpoint.runtime_info()

    def run_sample(self, suite, problem, effort: str, index: int, seed: int, temperature: float,
                   max_tokens: int) -> dict:
        body = chat_body(problem, effort, seed, temperature, max_tokens, self.date)
        t0 = time.perf_counter()
        try:
            response = self.endpoint.chat(body)
        except EndpointError as e:
            if e.code == "context_length_exceeded" or (e.status == 400 and "context" in e.message.lower()):
                return context_record(suite, problem, effort, index, seed, e.message)
            raise
        fields, tokens = reply_of(response)
        return graded_record(suite, problem, effort, index, seed, fields, tokens, time.perf_counter() - t0)

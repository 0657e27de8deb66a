"""The raw-text side of ``gptoss serve``: ``POST /v1/completions`` and vLLM's tokenizer endpoints.

``/v1/completions`` continues a prompt as it is, with no Harmony rendering: the prompt is text
(special tokens written as text, ``<|start|>``, are read as those tokens, as vLLM's tokenizer
reads them) or token ids, one or a list of them. ``logprobs: k`` gives each generated token's
log-probability and the k most likely (tokens named ``token_id:N`` with vLLM's
``return_tokens_as_token_ids``); ``echo`` puts the prompt before the completion, with its
tokens' log-probabilities (the first token has none: nothing comes before it). That is what
log-likelihood evaluations (lm-evaluation-harness's ``local-completions``: MMLU, HellaSwag, ARC)
ask for, with ``max_tokens`` 1 or 0. The prompt's figures come from ``Engine.prompt_logprobs`` on a
fresh sequence, the very numbers ``gptoss eval``'s perplexity sums; the generated tokens' from the
sampler (the model's own distribution, before temperature and penalties).

``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` are vLLM's (lm-evaluation-harness's
``tokenizer_backend=remote`` uses them): text to ids, ids to text, and what the tokenizer is.
"""

from __future__ import annotations

import codecs
import time

from .serve_api import Delta, Done, GenRequest, StopMatcher, token_text, usage
from .serve_params import (bad, bool_field, int_field, n_field, refuse_unsupported, sampling_fields, stops_field)
from .tokenizer import FIRST_SPECIAL_ID

COMPLETIONS_REFUSED = ("best_of", "suffix", "min_tokens", "guided_json", "guided_regex", "guided_choice",
                       "guided_grammar", "structured_outputs", "store")
DEFAULT_MAX_TOKENS = 16          # OpenAI's (and vLLM's) for completions


def encode_text(encoding, text: str) -> list[int]:
    """Prompt text to ids, special tokens written as text included."""
    return encoding.encode(text, allowed_special="all")


def token_ids(value, vocab_size: int, param: str) -> list[int]:
    if not value or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad(f"'{param}' must be text, a non-empty list of token ids, or a list of either", param)
    bad_id = next((t for t in value if not 0 <= t < vocab_size), None)
    if bad_id is not None:
        raise bad(f"{param}: token id {bad_id} is outside the vocabulary (0..{vocab_size - 1})", param)
    return list(value)


def prompts_field(value, encoding, vocab_size: int) -> list[list[int]]:
    """``prompt``: text, token ids, or a list of texts or of token-id lists; each as ids."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad("'prompt' must be text, a non-empty list of token ids, or a list of either", "prompt")
    out = []
    for i, p in enumerate(value):
        ids = encode_text(encoding, p) if isinstance(p, str) else token_ids(p, vocab_size, f"prompt[{i}]")
        if not ids:
            raise bad(f"prompt[{i}] is empty", "prompt")
        out.append(ids)
    return out


def completion_request(body: dict, encoding, vocab_size: int) -> tuple[GenRequest, list[list[int]]]:
    """A ``POST /v1/completions`` body as a ``GenRequest`` and its prompts' ids."""
    refuse_unsupported(body, COMPLETIONS_REFUSED)
    prompts = prompts_field(body.get("prompt"), encoding, vocab_size)
    logprobs = int_field(body, "logprobs", 0, 20)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    max_tokens = int_field(body, "max_tokens", 0)
    echo = bool_field(body, "echo")
    skip = body.get("skip_special_tokens", True)
    if not isinstance(skip, bool):
        raise bad("'skip_special_tokens' must be true or false", "skip_special_tokens")
    as_ids = bool_field(body, "return_tokens_as_token_ids")
    req = GenRequest(
        None, max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        sampling=sampling_fields(body, vocab_size, logprobs), seed=int_field(body, "seed"),
        stop=stops_field(body.get("stop")), stream=bool_field(body, "stream"),
        include_usage=bool(stream_options.get("include_usage")), ignore_eos=bool_field(body, "ignore_eos"),
        n=n_field(body), echo=echo, skip_special_tokens=skip, tokens_as_ids=as_ids)
    return req, prompts


class TextBuilder:
    """One completion choice: generated tokens to text (whole UTF-8 characters, stop strings held
    back as ``StopMatcher`` does) and, when asked for, each token's logprob entry (token, logprob,
    top logprobs, text offset), carried by the delta that carries its text."""

    def __init__(self, encoding, stops: list[str], choice: int, skip_special: bool, logprobs: int | None,
                 as_ids: bool = False):
        self.encoding, self.choice, self.skip, self.as_ids = encoding, choice, skip_special, as_ids
        self.want_logprobs = logprobs is not None
        self.text: list[str] = []
        self.entries: list[tuple] = []       # (token, logprob, top dict, text offset), all sent
        self.n_tokens = 0
        self._stops = StopMatcher(stops)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = 0                     # characters of text so far, held text included
        self._pending: list[tuple] = []

    @property
    def stop_hit(self) -> bool:
        return self._stops.hit

    def echo(self, prompt: list[int], logprobs=None, top_ids=None, top_lps=None) -> list[Delta]:
        """The prompt's text, and its tokens' entries (``Engine.prompt_logprobs``'s figures, given
        when logprobs are wanted)."""
        utf8, pieces = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
        for i, tok in enumerate(prompt):
            if self.want_logprobs:
                self._entry(tok, None, None) if i == 0 else self._entry(
                    tok, float(logprobs[i - 1]), zip(top_ids[i - 1].tolist(), top_lps[i - 1].tolist()))
            pieces.append(utf8.decode(self.encoding.decode_single_token_bytes(tok)))
            self._offset += len(pieces[-1])
        pieces.append(utf8.decode(b"", final=True))
        self._offset += len(pieces[-1])
        return self._out("".join(pieces), force=True)

    def feed(self, token_id: int, step=None) -> list[Delta]:
        self.n_tokens += 1
        if step is not None and step.logprob is not None:
            self._entry(token_id, step.logprob, step.top)
        if self.stop_hit:
            return []
        piece = b"" if self.skip and token_id >= FIRST_SPECIAL_ID else self.encoding.decode_single_token_bytes(token_id)
        text = self._utf8.decode(piece)
        self._offset += len(text)
        return self._out(self._stops.feed(text))

    def finish(self) -> list[Delta]:
        tail = self._utf8.decode(b"", final=True)
        out = self._stops.feed(tail) if tail and not self.stop_hit else ""
        return self._out(out + self._stops.flush(), force=bool(self._pending))

    def _out(self, text: str, force: bool = False) -> list[Delta]:
        if not text and not force:
            return []
        self.text.append(text)
        entries, self._pending = tuple(self._pending), []
        self.entries += entries
        return [Delta("content", text, choice=self.choice, logprobs=entries)]

    def _name(self, tok: int) -> str:
        return f"token_id:{tok}" if self.as_ids else token_text(self.encoding, tok)[0]

    def _entry(self, tok: int, logprob: float | None, top) -> None:
        name = self._name(tok)
        top_dict = None
        if logprob is not None:
            top_dict = {}
            for t, lp in top:                       # the most likely first; the token itself too
                top_dict.setdefault(self._name(t), lp)
            top_dict.setdefault(name, logprob)
        self._pending.append((name, logprob, top_dict, self._offset))


def logprobs_object(entries) -> dict:
    """The legacy completions ``logprobs``: parallel lists over the tokens."""
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}


def finish_reason(done: Done) -> str:
    return "length" if done.stop_reason in ("length", "context") else "stop"


def completion(rid: str, model: str, dones: list[Done]) -> dict:
    """The non-streaming ``text_completion`` object."""
    choices = [{"index": d.choice, "text": "".join(d.builder.text),
                "logprobs": logprobs_object(d.builder.entries) if d.builder.want_logprobs else None,
                "finish_reason": finish_reason(d)} for d in dones]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(dones)}


class CompletionChunks:
    """The chunks of a streamed completion: text as it comes (with its tokens' logprobs), then a
    chunk with each choice's finish_reason, then usage if asked for."""

    def __init__(self, rid: str, model: str, logprobs: bool):
        self.rid, self.model, self.created, self.logprobs = rid, model, int(time.time()), logprobs

    def _chunk(self, choices: list[dict], **extra) -> dict:
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def of(self, d: Delta) -> dict:
        return self._chunk([{"index": d.choice, "text": d.text,
                             "logprobs": logprobs_object(d.logprobs) if self.logprobs else None,
                             "finish_reason": None}])

    def last(self, done: Done) -> dict:
        return self._chunk([{"index": done.choice, "text": "", "logprobs": None, "finish_reason": finish_reason(done)}])

    def usage(self, dones: list[Done]) -> dict:
        return self._chunk([], usage=usage(dones))


# ---- vLLM's tokenizer endpoints ---------------------------------------------------------------


def tokenize_request(body: dict, encoding, render_messages) -> list[int]:
    """``/tokenize``: ``prompt`` (text) or ``messages`` (a chat, rendered as the chat API renders
    it, through ``render_messages``)."""
    if "messages" in body:
        return render_messages(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise bad("'prompt' must be text (or send 'messages')", "prompt")
    return encode_text(encoding, prompt)


def detokenize_request(body: dict, encoding, vocab_size: int) -> str:
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or (tokens and not all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in tokens)):
        raise bad("'tokens' must be a list of token ids", "tokens")
    if tokens:
        token_ids(tokens, vocab_size, "tokens")
    return encoding.decode(tokens, errors="replace")


def tokenizer_info(encoding, max_model_len: int) -> dict:
    """What vLLM's ``/tokenizer_info`` says: gpt-oss's special tokens and the context length."""
    return {"tokenizer_class": "tiktoken", "name": encoding.name, "eos_token": "<|return|>",
            "bos_token": "<|startoftext|>", "pad_token": "<|endoftext|>", "chat_template": None,
            "model_max_length": max_model_len, "vocab_size": encoding.n_vocab}

"""``gptoss bench --endpoint URL``: serving figures of any OpenAI-compatible server, measured from
the client side (``gptoss serve``, vLLM, SGLang, ollama).

For each prompt length P and concurrency C, C clients send a streamed chat completion at the same
moment (a barrier), each with its own prompt (a unique first line, so no server can answer it from
a prefix cache) of about P words, ``max_tokens`` = ``--gen-tokens`` and ``ignore_eos`` (vLLM's and
SGLang's field; ``gptoss serve`` has it too) so that every stream generates the same count. Per
stream, with arrival times taken as each server-sent event is read:

- ``ttft_ms``: from sending the request to the first event that carries generated text
  (reasoning, content or tool-call arguments). A server that holds back Harmony headers, as all
  of them do, counts those tokens in it;
- ``itl_p50/p90/p99_ms``: percentiles of the gaps between such events. A server that puts several
  tokens in one event makes fewer, longer gaps: this is inter-event latency as a client sees it;
- ``decode_tok_s``: (completion tokens - 1) / (last event - first event), completion tokens from
  the usage the stream ends with (``stream_options.include_usage``): the TPOT of vLLM's serving
  benchmark, inverted. Tokens a server generates before its first event (Harmony headers, a few
  tokens) inflate it slightly; with random weights (noise never closes a header: 128 tokens go by
  before any text) it is meaningless, and the table says RANDOM weights;
- ``total_tok_s``: the completion tokens of all C streams over the wall time of the round.

``--warmup`` rounds run first, unmeasured; ``--repeat`` rounds are measured, and each figure is
summarised (mean, std, median, values) over all streams of all measured rounds. The result says
which endpoint and model it measured and the prompt tokens the server counted (``prompt_tokens``).

A stream the server refuses with 429 (its queue is full) waits for the Retry-After the server
asks for and tries again (``retries_429`` counts them; the stream is timed from the accepted
attempt, so it overlaps the others less than C implies). If a level fails anyway, the levels that
finished are still reported (``incomplete`` says where it stopped and why) before the error.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import threading
import time
import uuid

from . import benchstats
from .bench import int_list
from .endpoint import Endpoint, EndpointError
from .errors import GptossError

SCHEMA = "gptoss-bench-endpoint/1"
MAX_RETRIES = 10          # 429s a stream retries before the level fails
MAX_RETRY_WAIT_S = 60.0
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work number night point home water "
         "room mother area money story fact month lot right study book eye job word business issue side kind").split()
FIGURES = (("ttft_ms", "TTFT ms", 1), ("itl_p50_ms", "ITL p50 ms", 2), ("itl_p90_ms", "ITL p90 ms", 2),
           ("itl_p99_ms", "ITL p99 ms", 2), ("decode_tok_s", "decode tok/s/stream", 1), ("total_tok_s", "total tok/s", 1))


def prompt_text(n_words: int, seed: int) -> str:
    """About ``n_words`` tokens of plain words after a unique first line."""
    words = [WORDS[(seed * 7919 + i * 104729) % len(WORDS)] for i in range(n_words)]
    return f"Request {uuid.uuid4().hex}. Continue this list:\n" + " ".join(words)


def one_stream(endpoint, text: str, gen_tokens: int, start: threading.Barrier) -> dict:
    """One streamed request, timed from the client side. A 429 (the server's queue is full) is
    retried after its Retry-After, up to ``MAX_RETRIES`` times; the stream is timed from the
    attempt that was accepted, and ``retries`` says how many were refused before it."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": gen_tokens, "ignore_eos": True,
            "temperature": 1.0}
    start.wait()
    for retries in range(MAX_RETRIES + 1):
        t0 = time.perf_counter()
        arrivals, usage = [], {}
        try:
            for t, chunk in endpoint.stream_chat(body):
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    d = choice.get("delta") or {}
                    if d.get("content") or d.get("reasoning_content") or d.get("reasoning") or d.get("tool_calls"):
                        arrivals.append(t)
        except EndpointError as e:
            if e.status != 429 or retries == MAX_RETRIES:
                raise
            time.sleep(min(MAX_RETRY_WAIT_S, 1.0 if e.retry_after is None else e.retry_after))
            continue
        end = time.perf_counter()
        return {"t0": t0, "end": end, "arrivals": arrivals, "completion_tokens": usage.get("completion_tokens", 0),
                "prompt_tokens": usage.get("prompt_tokens", 0), "retries": retries}


def one_round(endpoint, n_words: int, concurrency: int, gen_tokens: int, seed: int) -> list[dict]:
    barrier = threading.Barrier(concurrency)
    out: list[dict | BaseException] = [None] * concurrency

    def client(i):
        try:
            out[i] = one_stream(endpoint, prompt_text(n_words, seed + i), gen_tokens, barrier)
        except BaseException as e:     # reported by the caller's thread
            barrier.abort()
            out[i] = e

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in out if isinstance(r, BaseException) and not isinstance(r, threading.BrokenBarrierError)]
    if errors:
        raise errors[0]
    return out


def figures(streams: list[dict]) -> dict:
    """The per-stream figures of one round, and its aggregate throughput."""
    rows = []
    for s in streams:
        a = s["arrivals"]
        if not a:
            raise GptossError("a stream carried no generated text", "raise --gen-tokens (Harmony headers come first)")
        gaps = sorted(b - x for x, b in zip(a, a[1:]))
        span = a[-1] - a[0]
        rows.append({"ttft_ms": 1e3 * (a[0] - s["t0"]),
                     "itl_p50_ms": 1e3 * benchstats.percentile(gaps, 50) if gaps else None,
                     "itl_p90_ms": 1e3 * benchstats.percentile(gaps, 90) if gaps else None,
                     "itl_p99_ms": 1e3 * benchstats.percentile(gaps, 99) if gaps else None,
                     "decode_tok_s": (s["completion_tokens"] - 1) / span if span > 0 else None})
    wall = max(s["end"] for s in streams) - min(s["t0"] for s in streams)
    return {"rows": rows, "total_tok_s": sum(s["completion_tokens"] for s in streams) / wall}


def measure(endpoint, P: int, C: int, gen_tokens: int, repeat: int, warmup: int, bar) -> dict:
    for w in range(warmup):
        bar.step(f"prompt {P} · concurrency {C} · warm-up {w + 1}/{warmup}")
        one_round(endpoint, P, C, gen_tokens, seed=1000 * (w + 1))
    per_stream, totals, prompt_tokens, completion, retries = {k: [] for k, _, _ in FIGURES[:-1]}, [], [], [], 0
    for r in range(repeat):
        bar.step(f"prompt {P} · concurrency {C} · round {r + 1}/{repeat}")
        streams = one_round(endpoint, P, C, gen_tokens, seed=r)
        f = figures(streams)
        totals.append(f["total_tok_s"])
        for row in f["rows"]:
            for k, v in row.items():
                if v is not None:
                    per_stream[k].append(v)
        prompt_tokens += [s["prompt_tokens"] for s in streams]
        completion += [s["completion_tokens"] for s in streams]
        retries += sum(s["retries"] for s in streams)
    result = {"prompt_words": P, "concurrency": C, "gen_tokens": gen_tokens,
              "prompt_tokens": benchstats.summarize(prompt_tokens), "completion_tokens": benchstats.summarize(completion),
              "retries_429": retries}
    for k, values in per_stream.items():
        result[k] = benchstats.summarize(values) if values else None
    result["total_tok_s"] = benchstats.summarize(totals)
    return result


def run(*, endpoint: str, api_key: str | None, served_model: str | None, prompt_lens: str, gen_tokens: int,
        concurrency: str, repeat: int, warmup: int, fmt: str, output=None) -> dict:
    lens, levels = int_list(prompt_lens, "--prompt-lens", 1), int_list(concurrency, "--concurrency", 1)
    if gen_tokens < 2:
        raise GptossError(f"--gen-tokens {gen_tokens}: decode needs at least 2 tokens")
    if repeat < 1 or warmup < 0:
        raise GptossError("--repeat must be at least 1 and --warmup at least 0")
    ep = Endpoint(endpoint, api_key, served_model)
    t0 = time.perf_counter()
    results, level, stopped = [], None, None
    try:
        with benchstats.Progress(enabled=True, total=len(lens) * len(levels) * (warmup + repeat)) as bar:
            for level in ((P, C) for P in lens for C in levels):
                results.append(measure(ep, *level, gen_tokens, repeat, warmup, bar))
    except (GptossError, KeyboardInterrupt) as e:
        if not results:
            raise
        stopped = (*level, e)
    finally:
        ep.close()
    result = {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "endpoint": ep.url, "model": ep.info, "settings": {"prompt_lens": lens, "concurrency": levels,
                                                                  "gen_tokens": gen_tokens, "repeat": repeat,
                                                                  "warmup": warmup},
              "wall_s": time.perf_counter() - t0, "results": results}
    if stopped is not None:
        P, C, e = stopped
        result["incomplete"] = {"prompt_words": P, "concurrency": C,
                                "error": "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)}
    emit(result, fmt, sys.stdout)
    if output is not None:
        with open(output, "w", encoding="utf-8") as f:
            emit(result, fmt if fmt in ("json", "md") else "json", f)
    if stopped is not None:        # the levels that finished are out; now the failure, as one line
        if isinstance(stopped[2], KeyboardInterrupt):
            raise stopped[2]
        raise GptossError(f"stopped at prompt {P} · concurrency {C}: {stopped[2]}",
                          f"the table has the {len(results)} level(s) that finished")
    return result


def _cell(stats: dict | None, digits: int) -> str:
    return "-" if stats is None else f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def describe(result: dict) -> str:
    m = result["model"]
    extra = " · RANDOM weights" if m.get("random_weights") else ""
    return f"gptoss bench --endpoint {result['endpoint']} · model {m.get('id')}{extra}"


def notes(result: dict) -> list[str]:
    """What the table cannot show: refused attempts, and where an incomplete run stopped."""
    out = []
    retried = sum(r.get("retries_429", 0) for r in result["results"])
    if retried:
        out.append(f"{retried} attempt(s) were refused with 429 and retried after Retry-After")
    if result.get("incomplete"):
        i = result["incomplete"]
        out.append(f"INCOMPLETE: stopped at prompt {i['prompt_words']} · concurrency {i['concurrency']}: {i['error']}")
    return out


def emit(result: dict, fmt: str, out) -> None:
    headers = ["prompt words", "prompt tok", "concurrency", "gen"] + [label for _, label, _ in FIGURES]
    rows = [[str(r["prompt_words"]), f"{r['prompt_tokens']['mean']:.0f}", str(r["concurrency"]), str(r["gen_tokens"])]
            + [_cell(r[k], d) for k, _, d in FIGURES] for r in result["results"]]
    if fmt == "csv":                   # numbers only: the means
        rows = [row[:4] + ["" if r[k] is None else f"{r[k]['mean']:.4f}" for k, _, _ in FIGURES]
                for row, r in zip(rows, result["results"])]
    if fmt == "json":
        out.write(json.dumps(result, indent=2) + "\n")
    elif fmt in ("md", "csv"):
        sep = "," if fmt == "csv" else " | "
        lines = [f"**{describe(result)}**", ""] if fmt == "md" else []
        lines.append(("| " if fmt == "md" else "") + sep.join(headers) + (" |" if fmt == "md" else ""))
        if fmt == "md":
            lines.append("| " + " | ".join("---:" for _ in headers) + " |")
        lines += [("| " if fmt == "md" else "") + sep.join(row) + (" |" if fmt == "md" else "") for row in rows]
        if fmt == "md":
            lines += [""] + [f"*{n}*" for n in notes(result)]
        out.write("\n".join(lines) + "\n")
    else:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        n = result["settings"]["repeat"]
        caption = "\n".join([f"mean ± std over the streams of {n} measured round(s); measured by the client",
                             *notes(result)])
        table = Table(title=Text(describe(result)), title_justify="left", caption=Text(caption))
        for h in headers:
            table.add_column(h, justify="right")
        for row in rows:
            table.add_row(*row)
        con = Console(file=out)
        (con if con.is_terminal else Console(file=out, width=220)).print(table)

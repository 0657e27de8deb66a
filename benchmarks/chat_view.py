"""How many tokens a second the chat view takes: Harmony parsing plus Rich rendering, no model.

A GPU decodes gpt-oss-20b at 500+ tokens/s; if the terminal view costs more than 2 ms a token,
the view, not the model, sets the pace of a chat (and the decode figure of the stats line
counts the view's time). This feeds ``ReplyView`` the tokens of a realistic answer (headings,
paragraphs, nested lists, code fences, tables: ``chat_markdown.sample_markdown``), as fast as
it takes them, through the same ``StreamParser`` the chat uses, on a Console that believes it is
a terminal (colours, live regions, the refresh thread) but writes to memory, so the terminal
emulator's own cost is not counted. Cases: the answer as Markdown on a terminal, the reasoning
streamed on a terminal, the answer on a pipe. One line per case, then JSON as the last line.

Run on any machine:  python benchmarks/chat_view.py [--tokens 8000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time

from rich.console import Console

from gptoss_cli.chat_markdown import sample_markdown
from gptoss_cli.chat_view import ReplyView
from gptoss_cli.harmony import StreamParser
from gptoss_cli.tokenizer import load_encoding

CASES = {  # name: (channel, terminal)
    "answer-markdown-terminal": ("final", True),
    "reasoning-terminal": ("analysis", True),
    "answer-pipe": ("final", False),
}


def answer_tokens(enc, n_tokens: int, seed: int = 0) -> list[int]:
    """``n_tokens`` tokens of a realistic Markdown answer."""
    blocks = 40
    while True:
        tokens = enc.encode_ordinary(sample_markdown(blocks, seed))
        if len(tokens) >= n_tokens:
            return tokens[:n_tokens]
        blocks *= 2


def run_case(enc, body: list[int], channel: str, terminal: bool, width: int) -> dict:
    """Feed one reply (header, then ``body``) through the parser and the view; time it."""
    header = enc.encode(f"<|channel|>{channel}<|message|>", allowed_special="all")
    end = enc.encode("<|return|>" if channel == "final" else "<|end|>", allowed_special="all")
    sink = io.StringIO()
    console = Console(file=sink, force_terminal=terminal, width=width, height=50,
                      color_system="truecolor" if terminal else None)
    view = ReplyView(console, show_reasoning=True)
    parser = StreamParser(enc)
    t0 = time.perf_counter()
    for tok in header + body + end:
        for event in parser.feed(tok):
            view(event)
    for event in parser.finish():
        view(event)
    view.close()
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 4), "tok_s": round(len(body) / seconds, 1),
            "ms_per_token": round(1000 * seconds / len(body), 4), "output_bytes": len(sink.getvalue())}


def parser_only(enc, body: list[int]) -> float:
    """Tokens/s of the Harmony parser alone (the part of each case that is not the view)."""
    parser = StreamParser(enc)
    tokens = enc.encode("<|channel|>final<|message|>", allowed_special="all") + body
    t0 = time.perf_counter()
    for tok in tokens:
        parser.feed(tok)
    parser.finish()
    return round(len(body) / (time.perf_counter() - t0), 1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best is reported")
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--only", default="", help="comma-separated case names")
    args = ap.parse_args()
    enc = load_encoding(None)
    body = answer_tokens(enc, args.tokens)
    text_chars = len(enc.decode(body))
    results = {}
    for name, (channel, terminal) in CASES.items():
        if args.only and name not in args.only.split(","):
            continue
        runs = [run_case(enc, body, channel, terminal, args.width) for _ in range(args.repeat)]
        best = max(runs, key=lambda r: r["tok_s"])
        results[name] = {**best, "runs_tok_s": [r["tok_s"] for r in runs]}
        print(f"{name:26s} {best['tok_s']:>10,.1f} tok/s  {best['ms_per_token']:.3f} ms/token  "
              f"(runs: {', '.join(f'{r:,.0f}' for r in results[name]['runs_tok_s'])})", flush=True)
    summary = {
        "benchmark": "chat_view", "tokens": len(body), "answer_chars": text_chars, "width": args.width,
        "parser_only_tok_s": parser_only(enc, body), "cases": results,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

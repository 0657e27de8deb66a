"""The ``gptoss`` command: parses options and hands them to the module that owns the subcommand.

No logic lives here. Every subcommand runs under ``_guard``, which turns a ``GptossError`` into one
line on stderr and a non-zero exit, and Ctrl-C into a clean exit; tracebacks are only shown with
``GPTOSS_DEBUG=1``.
"""

from __future__ import annotations

import enum
import functools
import importlib
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .config import MAX_TEMPERATURE
from .errors import GptossError

DEFAULT_MODEL = "openai/gpt-oss-20b"

class _App(typer.Typer):
    """The Typer app, run so that a bad option or value is one ``error:`` line (with the command's
    --help to read) like every other error of the tool, not Typer's framed box."""

    def __call__(self, *args, **kwargs):
        exceptions = _click_exceptions()
        try:
            code = super().__call__(*args, **kwargs, standalone_mode=False)
        except exceptions.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # plain `gptoss`: the help (Rich printed it already)
                if e.format_message().strip():
                    e.show()
            else:
                where = e.ctx.command_path if e.ctx is not None else "gptoss"
                message = " ".join(e.format_message().split()).rstrip(".")
                _error(escape_markup(f"{message[:1].lower()}{message[1:]} (see {where} --help)"))
            code = e.exit_code
        except exceptions.ClickException as e:
            _error(escape_markup(" ".join(e.format_message().split())))
            code = e.exit_code
        except _abort_classes():           # Ctrl-C at a prompt of click's
            print("aborted", file=sys.stderr)
            code = 1
        sys.exit(code if isinstance(code, int) else 0)


def _click_exceptions():
    """click's exception classes: Typer vendors click from 0.20 on, earlier it imports click."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _abort_classes() -> tuple[type[BaseException], ...]:
    """click's Abort: in typer.exceptions from Typer 0.29 on (its vendored click no longer has
    it: naming it there raised AttributeError inside every exit, e.g. `gptoss --help | head`)."""
    found = []
    for module in ("typer.exceptions", "typer._click.exceptions", "click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), "Abort"))
        except (ImportError, AttributeError):
            continue
    return tuple(dict.fromkeys(found))


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)


app = _App(
    name="gptoss",
    help="Chat with, benchmark, download and evaluate OpenAI's gpt-oss models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _error(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}", markup=True)


def _guard(fn):
    """Run a subcommand; user errors become one line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GptossError as e:
            if os.environ.get("GPTOSS_DEBUG"):
                raise
            from rich.markup import escape

            _error(escape(str(e)))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as e:  # a bug of ours: say so in one line, keep the traceback opt-in
            if os.environ.get("GPTOSS_DEBUG"):
                raise
            from rich.markup import escape

            _error(escape(f"internal error: {type(e).__name__}: {e} (set GPTOSS_DEBUG=1 for the traceback)"))
            raise typer.Exit(70) from None

    return wrapper


def _version(value: bool):
    if value:
        print(f"gptoss {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    """Chat with, benchmark, download and evaluate OpenAI's gpt-oss models."""


MODEL_HELP = "A checkpoint folder, a hub id in the local Hugging Face cache, or a preset name."


# Options with a fixed set of values are Typer choices: --help lists them and a wrong one gets
# Typer's usage error. The modules below take the plain strings (``.value``).
class Effort(str, enum.Enum):
    low = "low"
    medium = "medium"
    high = "high"


class Reasoning(str, enum.Enum):
    show = "show"
    hide = "hide"


class Dtype(str, enum.Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float32 = "float32"


class Layout(str, enum.Enum):
    hf = "hf"
    original = "original"
    both = "both"


class Format(str, enum.Enum):
    table = "table"
    json = "json"
    csv = "csv"
    md = "md"


def _device(value: str) -> str:
    """--device is auto, cpu, cuda or cuda:N: not a fixed list, so checked here, as a usage error."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


def _no_check(value: bool) -> bool:
    """--no-check: no check of the fast ops at load (``selfcheck``), for this process."""
    if value:
        os.environ["GPTOSS_CHECK"] = "0"
    return value


NO_CHECK_HELP = "Skip the check of the fast ops against their references at load (gptoss doctor runs it in full)."
DEVICE_HELP = "auto, cpu, cuda or cuda:N."
THREADS_HELP = "CPU threads (default: $GPTOSS_THREADS, else the physical cores)."
TEMPERATURE_HELP = f"Sampling temperature, 0 to {MAX_TEMPERATURE:g}; 0 is greedy."


def _use_threads(threads: int | None) -> None:
    """--threads: the same setting as GPTOSS_THREADS (the native library and PyTorch read it)."""
    if threads is not None:
        os.environ["GPTOSS_THREADS"] = str(threads)
PARALLEL_HELP = ("Sequences decoded together, sharing each decode step (default: 8 on a GPU, 4 on a CPU; "
                 "1: one at a time). Each holds its own KV cache of --context tokens.")
SERVED_MODEL_HELP = "The model's name on --endpoint (default: the one model it serves)."
ENDPOINT_HELP = ("Run against this OpenAI-compatible server (gptoss serve, vLLM, SGLang) instead of a local model, "
                 "e.g. http://127.0.0.1:8000/v1.")


@app.command()
@_guard
def download(
    model: str = typer.Argument("gpt-oss-20b", help="gpt-oss-20b, gpt-oss-120b, a hub repo id, or tiny-random."),
    layout: Layout = typer.Option(Layout.hf, "--layout", help="Which weight files to fetch: hf (repo root), original (original/), or both."),
    local_dir: Optional[Path] = typer.Option(None, "--local-dir", help="Download into this folder instead of the Hugging Face cache."),
    revision: Optional[str] = typer.Option(None, "--revision", help="A branch, tag or commit of the hub repo."),
    list_: bool = typer.Option(False, "--list", help="List the models already on disk, with their sizes."),
    eval_name: Optional[str] = typer.Option(None, "--eval", help="Fetch an eval data set (aime25, gpqa-diamond) instead of a model."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
):
    """Fetch a gpt-oss model from the Hugging Face hub (or write a tiny random one offline)."""
    from . import download as mod

    mod.run(model=model, layout=layout.value, local_dir=local_dir, revision=revision, list_=list_,
            eval_name=eval_name, yes=yes)


@app.command()
@_guard
def chat(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    effort: Effort = typer.Option(Effort.medium, "--effort", "-e", help="Reasoning effort."),
    system: Optional[str] = typer.Option(None, "--system", help="The system message's model-identity line (instead of 'You are ChatGPT, ...')."),
    developer: Optional[str] = typer.Option(None, "--developer", help="Developer instructions."),
    temperature: float = typer.Option(1.0, "--temperature", "--temp", help=TEMPERATURE_HELP),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    max_tokens: int = typer.Option(4096, "--max-tokens", "-n", help="Most tokens generated per reply."),
    context: int = typer.Option(8192, "--context", "-c", help="Context length (KV cache size) in tokens."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help=THREADS_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    reasoning: Reasoning = typer.Option(Reasoning.show, "--reasoning", help="Stream the reasoning, or collapse it to one line."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this prompt and exit ('-' reads stdin)."),
    json_out: bool = typer.Option(False, "--json", help="With --prompt: print one JSON object."),
    device: str = typer.Option("auto", "--device", callback=_device, help=DEVICE_HELP),
    dtype: Dtype = typer.Option(Dtype.auto, "--dtype", help="Activation dtype (auto: bfloat16 on a GPU and on CPUs with AVX512-BF16, else float32)."),
    no_check: bool = typer.Option(False, "--no-check", callback=_no_check, help=NO_CHECK_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="Download the model without asking if it is missing."),
    tools: Optional[str] = typer.Option(None, "--tools", help="Built-in tools to turn on: python, browser (comma-separated)."),
    yes_tools: bool = typer.Option(False, "--yes-tools", help="Run the model's tool calls without asking."),
):
    """Talk to gpt-oss in the terminal, or answer one prompt (--prompt)."""
    from . import chat as mod

    _use_threads(threads)
    mod.run(model=model, effort=effort.value, system=system, developer=developer, temperature=temperature,
            top_p=top_p, max_tokens=max_tokens, context=context, seed=seed, reasoning=reasoning.value,
            prompt=prompt, json_out=json_out, device=device, dtype=dtype.value, yes=yes, tools=tools,
            yes_tools=yes_tools)


@app.command()
@_guard
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    random_weights: Optional[str] = typer.Option(None, "--random-weights", help="Random MXFP4 weights in a preset's shape (gpt-oss-20b, gpt-oss-120b, small, tiny)."),
    prompt_lens: str = typer.Option("128,2048", "--prompt-lens", "-p", help="Comma-separated prompt lengths."),
    gen_tokens: int = typer.Option(128, "--gen-tokens", "-n", help="Tokens generated per run (the first comes from prefill; decode is timed over the rest)."),
    batch: str = typer.Option("1", "--batch", help="Comma-separated batch sizes (aligned streams)."),
    context_depth: str = typer.Option("0", "--context-depth", help="Comma-separated numbers of tokens already in the cache before the prompt."),
    repeat: int = typer.Option(3, "--repeat", "-r", help="Measured runs per configuration."),
    warmup: int = typer.Option(1, "--warmup", help="Unmeasured warm-up runs per configuration."),
    fmt: Format = typer.Option(Format.table, "--format", help="Output format (table: the essentials in 80 columns; json, csv, md: every figure)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="The table with every figure (latency percentiles, memory, GB/s)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the result to this file (JSON unless --format is csv or md)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="An earlier JSON result; exit 3 if a figure regressed."),
    max_regression: str = typer.Option("5%", "--max-regression", help="Largest allowed change for the worse against --baseline, in percent."),
    device: str = typer.Option("auto", "--device", callback=_device, help=DEVICE_HELP),
    dtype: Dtype = typer.Option(Dtype.auto, "--dtype", help="Activation dtype (auto: bfloat16 on a GPU and on CPUs with AVX512-BF16, else float32)."),
    no_check: bool = typer.Option(False, "--no-check", callback=_no_check, help=NO_CHECK_HELP),
    graph: bool = typer.Option(True, "--graph/--no-graph", help="Capture the decode step in a CUDA graph (GPU only)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help=THREADS_HELP),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Measure this OpenAI-compatible server from the client side instead."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="GPTOSS_API_KEY", help="Bearer token for --endpoint."),
    served_model: Optional[str] = typer.Option(None, "--served-model", help=SERVED_MODEL_HELP),
    concurrency: str = typer.Option("1", "--concurrency", help="With --endpoint: comma-separated numbers of simultaneous streams."),
):
    """Measure prefill and decode speed, time to first token, memory and the roofline share."""
    _use_threads(threads)
    if endpoint:
        from . import bench_endpoint

        bench_endpoint.run(endpoint=endpoint, api_key=api_key, served_model=served_model, prompt_lens=prompt_lens,
                           gen_tokens=gen_tokens, concurrency=concurrency, repeat=repeat, warmup=warmup,
                           fmt=fmt.value, output=output)
        return
    from . import bench as mod

    mod.run(model=model, random_weights=random_weights, prompt_lens=prompt_lens, gen_tokens=gen_tokens,
            batch=batch, context_depth=context_depth, repeat=repeat, warmup=warmup, fmt=fmt.value,
            output=output, baseline=baseline, max_regression=max_regression, device=device,
            dtype=dtype.value, graph=graph, verbose=verbose)


@app.command()
@_guard
def serve(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; mind --api-key)."),
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on (0 picks a free one)."),
    context: int = typer.Option(8192, "--context", "-c", help="Context length (KV cache size) in tokens."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help=THREADS_HELP),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="GPTOSS_API_KEY", help="Require this bearer token."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait while --parallel run; more get 429."),
    parallel: Optional[int] = typer.Option(None, "--parallel", "-P", help=PARALLEL_HELP),
    device: str = typer.Option("auto", "--device", callback=_device, help=DEVICE_HELP),
    dtype: Dtype = typer.Option(Dtype.auto, "--dtype", help="Activation dtype (auto: bfloat16 on a GPU and on CPUs with AVX512-BF16, else float32)."),
    no_check: bool = typer.Option(False, "--no-check", callback=_no_check, help=NO_CHECK_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="Download the model without asking if it is missing."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="The model's name in the API (default: --model as given)."),
    max_body: str = typer.Option("4MiB", "--max-body", help="Largest request body taken (e.g. 4MiB, 500KB); larger gets 413."),
    cors_origins: Optional[str] = typer.Option(None, "--cors-origins", help="Comma-separated origins browsers may call from (* for any); default: none."),
):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/responses)."""
    from . import serve as mod

    _use_threads(threads)
    mod.run(model=model, host=host, port=port, context=context, api_key=api_key, max_queue=max_queue,
            device=device, dtype=dtype.value, yes=yes, served_model_name=served_model_name, max_body=max_body,
            cors_origins=cors_origins, parallel=parallel)


@app.command("eval")
@_guard
def eval_(
    suites: Optional[List[str]] = typer.Argument(None, help="Suite names (see --list), NAME=PATH for aime25, gpqa-diamond or perplexity, or a JSONL file."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    effort: str = typer.Option("low", "--effort", help="Comma-separated efforts: low,medium,high."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many problems (perplexity: files) per suite."),
    samples: int = typer.Option(1, "--samples", help="Samples per problem."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling and problem generation."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSON report; an existing one is resumed."),
    fail_under: Optional[str] = typer.Option(None, "--fail-under", help="Exit 1 if a suite x effort accuracy is below this (0-1 or 70%); perplexity is not gated by it."),
    max_perplexity: Optional[float] = typer.Option(None, "--max-perplexity", help="Exit 1 if a perplexity suite scores above this."),
    temperature: float = typer.Option(1.0, "--temperature", "--temp", help=TEMPERATURE_HELP),
    max_tokens: int = typer.Option(2048, "--max-tokens", "-n", help="Most tokens generated per answer."),
    context: int = typer.Option(8192, "--context", "-c", help="Context length in tokens."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help=THREADS_HELP),
    ppl_window: Optional[int] = typer.Option(None, "--ppl-window", help="Perplexity: tokens per window (default 512)."),
    ppl_stride: Optional[int] = typer.Option(None, "--ppl-stride", help="Perplexity: tokens between window starts (default 256)."),
    device: str = typer.Option("auto", "--device", callback=_device, help=DEVICE_HELP),
    dtype: Dtype = typer.Option(Dtype.auto, "--dtype", help="Activation dtype (auto: bfloat16 on a GPU and on CPUs with AVX512-BF16, else float32)."),
    no_check: bool = typer.Option(False, "--no-check", callback=_no_check, help=NO_CHECK_HELP),
    list_: bool = typer.Option(False, "--list", help="List the suites and exit."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Download the model without asking if it is missing."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help=ENDPOINT_HELP),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="GPTOSS_API_KEY", help="Bearer token for --endpoint."),
    served_model: Optional[str] = typer.Option(None, "--served-model", help=SERVED_MODEL_HELP),
    parallel: Optional[int] = typer.Option(None, "--parallel", "-P", help=PARALLEL_HELP.replace("1: one at a time", "1: one prompt at a time")),
):
    """Score a model on eval suites; exit non-zero under --fail-under."""
    from . import evals as mod

    _use_threads(threads)
    mod.run(suites=suites, model=model, effort=effort, limit=limit, samples=samples, seed=seed,
            output=output, fail_under=fail_under, temperature=temperature, max_tokens=max_tokens,
            context=context, device=device, dtype=dtype.value, max_perplexity=max_perplexity,
            ppl_window=ppl_window, ppl_stride=ppl_stride, list_=list_, yes=yes, endpoint=endpoint,
            api_key=api_key, served_model=served_model, parallel=parallel)


class Report(str, enum.Enum):
    table = "table"
    json = "json"


@app.command()
@_guard
def doctor(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Default: random weights (see --random-weights)."),
    random_weights: Optional[str] = typer.Option(None, "--random-weights", help="Random MXFP4 weights in a preset's shapes (gpt-oss-20b, gpt-oss-120b, small, tiny); gpt-oss-20b's when no --model."),
    device: str = typer.Option("auto", "--device", callback=_device, help=DEVICE_HELP),
    dtype: Dtype = typer.Option(Dtype.auto, "--dtype", help="Activation dtype (auto: bfloat16 on a GPU and on CPUs with AVX512-BF16, else float32)."),
    context: int = typer.Option(8192, "--context", "-c", help="Context length (KV cache size) in tokens."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help=THREADS_HELP),
    fmt: Report = typer.Option(Report.table, "--format", help="Output format."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Decode steps of the whole-step check (default 64; 16 on a CPU at gpt-oss's width)."),
):
    """Check every fast op (Triton kernels, the native CPU library) against its PyTorch reference here."""
    _use_threads(threads)
    from . import doctor as mod

    mod.run(model=model, random_weights=random_weights, device=device, dtype=dtype.value, context=context,
            fmt=fmt.value, steps=steps)


if __name__ == "__main__":
    app()

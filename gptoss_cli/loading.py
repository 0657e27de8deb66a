"""Loading a model for a subcommand: resolve it on disk, offer the download when it is missing,
load it once behind a spinner and say what was loaded (device, dtype, kernel path) and whether its
weights are random. ``gptoss chat``, ``gptoss eval`` and ``gptoss serve`` all load through here."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from . import selfcheck
from .errors import ModelNotFoundError


def load_engine(model: str, device: str, dtype: str, context: int, yes: bool, err: Console, quiet: bool = False):
    """Load the model once, with a spinner; offer to download it when it is not on disk."""
    from .engine import Engine
    from .resolve import repo_for, resolve_model

    try:
        folder = resolve_model(model)
    except ModelNotFoundError:
        if repo_for(model) is None:  # not something the hub has: nothing to offer
            raise
        folder = offer_download(model, yes, err)
    with err.status(f"Loading {escape(model)} from {escape(str(folder))}…", spinner="dots"):
        with selfcheck.quiet():                  # an op that failed its check: said below, once
            engine = Engine.load(folder, device=device, dtype=dtype, max_context=context)
        engine.tokenizer  # build the tokenizer now, not at the first prompt
        engine.warmup()   # compile the kernels, capture the decode graph (GPU; nothing on CPU)
    if not quiet:
        info = engine.runtime_info()
        ops = info["ops"].split(":")[0]          # why a fallback runs: the warning below says it
        if info["fallbacks"]:
            ops += f" (reference: {', '.join(info['fallbacks'])})"
        threads = f" · {info['threads']} thread{'s' if info['threads'] != 1 else ''}" if "threads" in info else ""
        err.print(Text(f"{model} · {info['device']} · {info['dtype']} · {ops}{threads} · context {context:,}", style="dim"),
                  soft_wrap=True)
    if engine.device.type == "cpu" and (line := _cpu_fallback_line()):
        err.print(Text(f"warning: {line}", style="yellow"), soft_wrap=True)
    for name, why in engine.fallbacks.items():
        line = selfcheck.fallback_line(name, why).removeprefix(selfcheck.WARNING_PREFIX)
        err.print(Text(f"warning: {line}", style="yellow"), soft_wrap=True)
    if engine.config.random_weights:
        err.print(Text("warning: this model has random weights (gptoss download tiny-random): its output is noise", style="yellow"), soft_wrap=True)
    return engine


def _cpu_fallback_line() -> str | None:
    """The native CPU library's fallback line, said here once; the runtime's own Python warning
    (for library users) is then silenced, so the command line shows one line, not a source line."""
    import warnings

    import torch

    from . import ops
    from .cpu_ops import fallback_line

    if not ops.use_cpu_native(torch.device("cpu")):
        return None
    line = fallback_line()
    if line:
        warnings.filterwarnings("ignore", message="CPU MoE: ", category=RuntimeWarning)
    return line


def offer_download(model: str, yes: bool, err: Console) -> Path:
    """Like ``ollama run``: show what the download is (files, size, free space), ask, fetch, go on.
    Offline, or without a terminal and without --yes, that is one error line saying what to do."""
    from . import download

    return download.pull(model, assume_yes=yes, console=err)

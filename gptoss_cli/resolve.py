"""Finding a model on disk from what the user typed after ``--model``.

Three forms, tried in this order, none touching the network:
1. a folder (HF layout, ``original/`` layout, or a full download holding both);
2. a name of gptoss's own data folder (``gptoss download tiny-random`` writes ``tiny-random``);
3. a hub id (``openai/gpt-oss-20b``) or a preset name (``gpt-oss-20b``) found in the local
   Hugging Face cache, as ``huggingface_hub`` lays it out (honours ``HF_HOME``/``HF_HUB_CACHE``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import PRESET_REPOS, PRESETS
from .errors import ModelNotFoundError


def data_dir() -> Path:
    """gptoss's own data folder: ``$GPTOSS_HOME``, else ``$XDG_DATA_HOME/gptoss``, else
    ``~/.local/share/gptoss``."""
    if os.environ.get("GPTOSS_HOME"):
        return Path(os.environ["GPTOSS_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join("~", ".local", "share")
    return Path(base).expanduser() / "gptoss"


def cache_dir() -> Path:
    """gptoss's cache folder (what can be rebuilt: the native CPU library, kernel check results):
    ``$GPTOSS_CACHE``, else ``$XDG_CACHE_HOME/gptoss``, else ``~/.cache/gptoss``."""
    if os.environ.get("GPTOSS_CACHE"):
        return Path(os.environ["GPTOSS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "gptoss"


def local_models_dir() -> Path:
    return data_dir() / "models"


def repo_for(spec: str) -> str | None:
    """The hub repo a model name refers to (a preset's repo, or the id itself)."""
    if spec in PRESET_REPOS:
        return PRESET_REPOS[spec]
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec
    return None


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The local Hugging Face cache's snapshot folder of ``repo``, or None."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo, revision=revision, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, a malformed id, a broken cache: not found
        # A one-layout download is "incomplete" to the hub client when it cached the repo's
        # whole file listing; the checkpoint reader decides whether what is there loads.
        partial = getattr(e, "snapshot_path", None)
        return Path(partial) if partial and Path(partial).is_dir() else None
    return Path(path)


def resolve_model(spec: str | os.PathLike) -> Path:
    """The folder holding the model ``spec`` names; ``ModelNotFoundError`` saying what to do."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        raise ModelNotFoundError(
            f"model folder {path} does not exist", "check --model, or run `gptoss download` first"
        )
    own = local_models_dir() / text
    if "/" not in text and own.is_dir():
        return own
    repo = repo_for(text)
    if repo is not None:
        snap = cached_snapshot(repo)
        if snap is not None:
            return snap
        raise ModelNotFoundError(
            f"model {text} is not on this machine (not in the Hugging Face cache)",
            f"run `gptoss download {text}` first, or pass --model FOLDER",
        )
    if text in PRESETS:
        raise ModelNotFoundError(
            f"{text!r} is a shape preset without weights",
            f"use `gptoss bench --random-weights {text}`, or `gptoss download tiny-random` for a loadable toy model",
        )
    raise ModelNotFoundError(
        f"model {text!r} not found: no such folder, and not a hub id like openai/gpt-oss-20b",
        "pass a checkpoint folder, gpt-oss-20b, gpt-oss-120b or a hub repo id",
    )

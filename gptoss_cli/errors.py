"""Errors a user can act on.

Every failure that bad input can cause (a broken checkpoint, a missing model, a full context) is
raised as a ``GptossError``: one line saying what is wrong and, where there is one, what to do.
The CLI prints that line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations

from pathlib import Path


class GptossError(Exception):
    """A problem with the user's input or environment, worded for the user."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class CheckpointError(GptossError):
    """The checkpoint folder is missing, incomplete, corrupt or not a gpt-oss model."""


class ModelNotFoundError(GptossError):
    """The model named by ``--model`` is neither a folder, nor in the local cache, nor a preset."""


class ContextFullError(GptossError):
    """The prompt does not fit in the engine's context."""


def why_not_written(path: str | Path, e: OSError) -> str:
    """Why writing ``path`` failed, in words. A file standing where a folder must be is named:
    the OS says only "File exists" or "Not a directory"."""
    blocker = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
    return f"{blocker} is a file, not a folder" if blocker is not None else (e.strerror or str(e))

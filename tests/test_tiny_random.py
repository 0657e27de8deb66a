"""`gptoss download tiny-random` is all or nothing: a run that fails part-way (here the file-size
limit of the process, which fails a write as a full disk does) leaves no half-written folder, and
an earlier tiny-random stays as it was."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_cli.config import PRESETS
from gptoss_cli.synthetic import write_checkpoint

GPTOSS = [sys.executable, "-m", "gptoss_cli"]
SMALL = PRESETS["tiny"].replace(vocab_size=512)


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def _download(tmp_path, *args, limit=False):
    env = {**os.environ, "GPTOSS_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(GPTOSS + ["download", "tiny-random", *args], env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=_limit_file_size if limit else None)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    r = _download(tmp_path, limit=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write tiny-random"), r.stderr
    models = tmp_path / "home" / "models"
    assert sorted(p.name for p in models.iterdir()) == []        # no tiny-random, no hidden partial folder


def test_a_failed_rewrite_keeps_the_earlier_model(tmp_path):
    folder = tmp_path / "home" / "models" / "tiny-random"
    write_checkpoint(folder, SMALL, layout="hf", seed=3, tokenizer=False)   # an earlier random model
    before = _files(folder)
    r = _download(tmp_path, limit=True)
    assert r.returncode == 1 and "cannot write tiny-random" in r.stderr
    assert _files(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny-random"]


def test_a_folder_holding_other_files_is_refused(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    r = _download(tmp_path, "--local-dir", str(other))
    assert r.returncode == 1 and "is not empty" in r.stderr and "Traceback" not in r.stderr
    assert _files(other) == {"notes.txt": b"keep me"}


def test_an_incomplete_tiny_random_says_how_to_redo_it(tmp_path):
    from gptoss_cli.checkpoint import Checkpoint
    from gptoss_cli.errors import CheckpointError

    folder = tmp_path / "home" / "models" / "tiny-random"
    write_checkpoint(folder, SMALL, layout="hf", tokenizer=False)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(CheckpointError, match="no .safetensors weights") as e:
        Checkpoint.open(folder)
    assert f"gptoss download tiny-random --local-dir {folder}" in str(e.value)

"""The Quick start as a new user runs it: gptoss-cli installed into a fresh virtual environment
with its declared dependencies and nothing else, then `gptoss download tiny-random` and a
one-shot chat.

The test extras (transformers, ...) bring packages the product may use without declaring them;
numpy was one (safetensors' ``save_file`` imports it), so the tests passed while the Quick start
failed. Here, offline, the new environment gets exactly the dependency closure of what the
project declares: the project is installed with ``pip install --no-deps --no-index``, its
installed metadata names its requirements, and those distributions (and theirs, recursively)
are linked in from this environment's site-packages. Anything else, numpy included when it is
not declared, is absent there as on a user's machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

requirements = pytest.importorskip("packaging.requirements")
utils = pytest.importorskip("packaging.utils")

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def _closure(reqs: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions ``reqs`` need, recursively (markers evaluated, no extras)."""
    installed = {utils.canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    found: dict[str, metadata.Distribution] = {}
    todo = list(reqs)
    while todo:
        req = requirements.Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = utils.canonicalize_name(req.name)
        if name in found:
            continue
        assert name in installed, f"{req} is declared but not installed here"
        found[name] = installed[name]
        todo += found[name].requires or []
    return found


def _link(dists: dict[str, metadata.Distribution], site: Path) -> list[Path]:
    """Link each distribution's top-level files and folders (from its RECORD) into ``site``."""
    made = []
    for dist in dists.values():
        tops = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        for top in sorted(tops):
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
                made.append(site / top)
    return made


def quick_start() -> list[str]:
    """The commands of README's Quick start (its first bash block), one per line and per ``&&``."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [cmd.strip() for line in lines if line for cmd in line.split("&&")]


def test_quick_start_installs_the_cpu_torch_first():
    """Pasted line by line on a CPU-only machine, the first install is PyTorch's CPU build: `pip
    install .` first would pull the CUDA build (gigabytes)."""
    cmds = quick_start()
    pips = [c for c in cmds if c.startswith("pip install")]
    assert pips[0].startswith("pip install torch") and "download.pytorch.org/whl/cpu" in pips[0], pips
    assert pips.index("pip install .") > 0


@pytest.mark.slow  # a wheel build, writing tiny-random (~7 s), two chats in new interpreters
def test_fresh_venv_quick_start(tmp_path):
    venv, src = tmp_path / "venv", tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)                # the build writes build/ into its source
    r = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert r.returncode == 0, r.stderr
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}

    # Build and install the project with only its build backend present, then take that away.
    try:
        metadata.distribution("setuptools")
    except metadata.PackageNotFoundError:
        pytest.skip("no setuptools here to build the project offline")
    build = _link(_closure(["setuptools"]), site)
    r = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
              "--no-build-isolation", "--no-index", str(src)], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for link in build:
        link.unlink()
    r = _run([str(python), "-c", "import importlib.metadata as m, json; print(json.dumps(m.requires('gptoss-cli')))"],
             env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    declared = [q for q in json.loads(r.stdout) if "extra ==" not in q]
    closure = _closure(declared)
    assert "triton" not in closure            # the CPU path installs without Triton's 286 MB
    _link(closure, site)

    # README's Quick start, its gptoss commands as written (the chat reads one message from stdin)
    env |= {"GPTOSS_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
            "PATH": f"{python.parent}{os.pathsep}{env['PATH']}"}
    commands = [c for c in quick_start() if c.startswith("gptoss ")]
    assert commands[0] == "gptoss download tiny-random" and commands[1].startswith("gptoss chat")
    for cmd in commands:
        r = _run(cmd.split(), env=env, cwd=tmp_path, input="hi\n")
        assert r.returncode == 0, f"{cmd}: {r.stderr}"
        assert "Warning" not in r.stderr and "Traceback" not in r.stderr, f"{cmd}: {r.stderr}"
    # and a one-shot chat
    r = _run(["gptoss", "chat", "--model", "tiny-random", "--prompt", "hi", "--max-tokens", "8", "--seed", "1"],
             env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "ttft" in r.stderr and "random weights" in r.stderr
    assert "Warning" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _run([str(python), "-c", "import gptoss_cli, sys; print(gptoss_cli.__file__); import transformers"],
             env=env, cwd=tmp_path)
    assert str(venv) in r.stdout and "No module named 'transformers'" in r.stderr  # the test extras are absent

"""The checkout's ``kernels/`` folder never shadows Hugging Face's ``kernels`` package.

transformers 5 imports ``kernels`` for MXFP4 models. ``python -c``, ``python -m pytest`` and a
script run from the repository root put the working directory first on ``sys.path``, so a
``kernels/__init__.py`` there would be found before the installed package. Our kernels live one
level down (``kernels/gptoss_kernels``) and ``kernels/`` is no package: at most a namespace
portion, which loses to any regular package later on the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, pythonpath: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_installed_kernels_package_wins_from_the_repository_root(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
    out = _python("import kernels; print(kernels.__file__, getattr(kernels, 'STAND_IN', False))",
                  cwd=ROOT, pythonpath=site)
    assert out == f"{site / 'kernels' / '__init__.py'} True"


def test_kernels_folder_is_not_a_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "gptoss_kernels" / "__init__.py").exists()


def test_gptoss_kernels_is_the_checkouts(tmp_path):
    """From anywhere (here an empty folder), ``gptoss_kernels`` is the installed project's."""
    out = _python("import gptoss_kernels; print(gptoss_kernels.__file__)", cwd=tmp_path)
    assert Path(out).read_bytes() == (ROOT / "kernels" / "gptoss_kernels" / "__init__.py").read_bytes()


def _imports(module: Path) -> set[str]:
    """The package's modules that ``module`` imports, at the top or inside functions."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return out


def test_no_module_of_the_package_imports_itself_back():
    """Modules import downwards only: a circle (endpoint.py <-> evals.py once) means something both
    need belongs below both."""
    graph = {f.stem: _imports(f) for f in (ROOT / "gptoss_cli").glob("*.py")}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep == path[0]:
                circles.append(" -> ".join(path + [dep]))
            elif dep not in path:
                visit(dep, path + [dep])

    for start in sorted(graph):
        visit(start, [start])
    assert circles == []

"""``benchmarks/gpu_session.sh`` without a GPU: what a lent GPU's one call would bring back.

The device tool returns at most 8 files from ``$OUT``; the session packs its logs into one
archive beside one ``summary.md``. A dry run (``GPU_SESSION_DRY_RUN=1``, or no GPU) skips every
GPU step but makes both files, so their shape is checked here, with the steps' order and limits.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_session.sh"
STEP_LIMITS_S = 540         # the call's 600 s less the versions, the install and the packing


def test_dry_run_leaves_two_files_and_a_summary(tmp_path):
    out = tmp_path / "out"
    env = os.environ | {"OUT": str(out), "GPU_SESSION_DRY_RUN": "1",
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120,
                         cwd=SCRIPT.parent.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_session.tar.gz", "summary.md"]          # at most 8 come back
    summary = (out / "summary.md").read_text()
    assert summary in run.stdout                                   # the table is printed too
    rows = re.findall(r"^\| (\w+) \| (\d+) \| ([^|]+) \|", summary, re.M)
    names = [name for name, _, _ in rows if name != "step"]
    assert names[0] == "doctor_20b"                                # correctness first
    assert names.index("decode_20b_2k") < names.index("prefill_20b_8k") < names.index("decode_120b_2k") \
        < names.index("decode_20b_32k")
    assert sum(int(limit) for name, limit, _ in rows if name != "step") <= STEP_LIMITS_S
    assert all(status.strip() == "skipped: no GPU" for name, _, status in rows if name != "step")
    with tarfile.open(out / "gpu_session.tar.gz") as tar:
        assert "./versions.txt" in tar.getnames()

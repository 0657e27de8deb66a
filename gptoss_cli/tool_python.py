"""The ``python`` tool: a persistent Jupyter kernel per chat session, with limits and isolation.

gpt-oss was trained to send code to a stateful notebook and read back what it printed, so this
runs the real Jupyter machinery (``jupyter_client`` talking to an ``ipykernel``), not a home-made
REPL. The kernel starts at the first call, in a scratch folder under gptoss's data folder, and
lives until the chat ends; ``/load`` and ``/reset`` start a fresh one.

Limits: a wall-time limit per call (120 s by default, the figure the model is told; past it the
kernel is interrupted and keeps its state), a CPU-time limit per call (``RLIMIT_CPU`` raised before
each call to what the kernel has used plus the limit; past it the kernel is killed), an
address-space limit (``RLIMIT_AS``), and output cut to ``output_chars`` (head and tail kept).

Isolation (``isolation()``), the strongest this machine allows:
- ``namespaces``: as root on Linux, ``unshare -n -m``: a new, empty network namespace (no network
  at all) and a mount namespace where everything but the scratch folder is read-only, with every
  capability dropped (``tool_python_sandbox``);
- ``bubblewrap``: ``bwrap`` when installed (no root needed): the same, from bubblewrap;
- ``none``: the code runs as the user, with the user's files and network. The consent prompt says so.
Kernel and client talk over Unix sockets (ZMQ ``ipc``), which cross the network namespace.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import GptossError

try:
    import resource
except ImportError:  # Windows: no rlimits; the wall-time limit still holds
    resource = None

SANDBOX = Path(__file__).with_name("tool_python_sandbox.py")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class PythonLimits:
    wall_s: float = 120.0                 # per call; the model is told this figure
    cpu_s: float = 120.0                  # per call
    memory_bytes: int = 4 << 30           # address space of the kernel process
    output_chars: int = 6000              # what goes back to the model: head and tail kept


@dataclass(frozen=True)
class Isolation:
    kind: str           # namespaces | bubblewrap | none
    words: str          # what the consent prompt says
    network_cut: bool


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@lru_cache(maxsize=None)
def isolation(wanted: str | None = None) -> Isolation:
    """The isolation this machine allows (``GPTOSS_PYTHON_ISOLATION=none`` turns it off)."""
    wanted = wanted or os.environ.get("GPTOSS_PYTHON_ISOLATION", "auto")
    if wanted not in ("auto", "none", "namespaces", "bubblewrap"):
        raise GptossError(f"GPTOSS_PYTHON_ISOLATION={wanted!r} is not one of auto, namespaces, bubblewrap, none")
    cut = "isolated: no network, files read-only outside its folder"
    if wanted in ("auto", "namespaces") and sys.platform == "linux" and hasattr(os, "geteuid") \
            and os.geteuid() == 0 and shutil.which("unshare") and _works(["unshare", "-n", "-m", "true"]):
        return Isolation("namespaces", f"{cut} (Linux namespaces)", True)
    if wanted in ("auto", "bubblewrap") and shutil.which("bwrap") and \
            _works(["bwrap", "--ro-bind", "/", "/", "--unshare-net", "true"]):
        return Isolation("bubblewrap", f"{cut} (bubblewrap)", True)
    if wanted not in ("auto", "none"):
        raise GptossError(f"{wanted} isolation is not available here", "GPTOSS_PYTHON_ISOLATION=auto picks what is")
    return Isolation("none", "NOT isolated: the code runs as you, with your files and your network "
                     "(run as root on Linux, or install bubblewrap, to isolate it)", False)


def truncate(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters: its head and its tail, with what was cut said."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 2 // 3], text[-(limit // 3):]
    return f"{head}\n[... {len(text) - len(head) - len(tail):,} characters cut ...]\n{tail}"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class ToolInterrupted(Exception):
    """Ctrl-C stopped a running call; ``output`` is what it printed before."""

    def __init__(self, output: str):
        super().__init__("interrupted")
        self.output = output


class PythonTool:
    """One kernel for one chat session."""

    def __init__(self, folder: Path | None = None, limits: PythonLimits | None = None,
                 isolation_kind: str | None = None):
        from .resolve import data_dir

        self.limits = limits or PythonLimits()
        self.isolation = isolation(isolation_kind)
        self.folder = Path(folder) if folder else data_dir() / "python" / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
        self._km = self._kc = None
        self._run_dir: str | None = None
        self.pid: int | None = None
        self.start_s: float | None = None       # how long the last kernel start took

    def description_words(self) -> dict:
        """What the model is told (harmony_tools.python_description)."""
        return {"timeout_s": self.limits.wall_s, "drive": str(self.folder),
                "internet": "disabled" if self.isolation.network_cut else "UNKNOWN. Depends on the cluster"}

    # ---- the kernel --------------------------------------------------------------------------------
    def _argv(self) -> list[str]:
        scratch, run = str(self.folder), self._run_dir
        inner = [sys.executable, str(SANDBOX), "--scratch", scratch, "--run", run,
                 "--memory", str(self.limits.memory_bytes)]
        if self.isolation.kind == "namespaces":
            argv = ["unshare", "-n", "-m", "--", *inner, "--readonly"]
        elif self.isolation.kind == "bubblewrap":
            argv = ["bwrap", "--ro-bind", "/", "/", "--dev-bind", "/dev", "/dev", "--bind", scratch, scratch,
                    "--bind", run, run, "--unshare-net", "--die-with-parent", "--", *inner]
        else:
            argv = inner
        return argv + ["--", "-f", "{connection_file}", "--HistoryManager.enabled=False", "--colors=NoColor"]

    def start(self) -> None:
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpec

        t0 = time.perf_counter()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GptossError(f"cannot make the python tool's folder {self.folder}: {e.strerror}") from None
        self._run_dir = tempfile.mkdtemp(prefix="gptoss-kernel-")  # short: Unix socket paths are
        env = {**os.environ, "IPYTHONDIR": str(self.folder / ".ipython"), "TMPDIR": str(self.folder),
               "MPLCONFIGDIR": str(self.folder / ".matplotlib"), "MPLBACKEND": "Agg",
               "JUPYTER_RUNTIME_DIR": self._run_dir, "PYTHONNOUSERSITE": "1"}
        km = KernelManager(transport="ipc", ip=os.path.join(self._run_dir, "k"),
                           connection_file=os.path.join(self._run_dir, "kernel.json"))
        km._kernel_spec = KernelSpec(argv=self._argv(), language="python", display_name="gptoss python")
        try:
            km.start_kernel(env=env, cwd=str(self.folder))
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=60)
        except (RuntimeError, OSError) as e:
            if km.has_kernel:
                km.shutdown_kernel(now=True)
            raise GptossError(f"the python kernel did not start: {e}") from None
        self._km, self._kc = km, kc
        self.pid = int(self._quiet("import os as _o; print(_o.getpid()); del _o").strip())
        self.start_s = time.perf_counter() - t0

    def _quiet(self, code: str) -> str:
        out: list[str] = []
        self._kc.execute_interactive(code, silent=False, store_history=False, timeout=30,
                                     output_hook=lambda m: out.append(m["content"].get("text", "")))
        return "".join(out)

    @property
    def alive(self) -> bool:
        return self._km is not None and self._km.is_alive()

    def shutdown(self) -> None:
        if self._kc is not None:
            self._kc.stop_channels()
        if self._km is not None:
            try:
                self._km.shutdown_kernel(now=True)
            except Exception:  # noqa: BLE001 - a kernel that is already gone
                pass
        if self._run_dir:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        self._km = self._kc = self.pid = self._run_dir = None

    def restart(self) -> None:
        """A fresh kernel at the next call (``/load``, ``/reset``)."""
        self.shutdown()

    # ---- a call ------------------------------------------------------------------------------------
    def run(self, code: str) -> str:
        """Run ``code``; return what it printed (results, errors) cut to size. Ctrl-C interrupts
        the kernel and raises ``ToolInterrupted``."""
        if not self.alive:
            self.shutdown()
            self.start()
        lim = self.limits
        if hasattr(resource, "prlimit") and self.pid and os.path.exists(f"/proc/{self.pid}"):
            soft = int(_cpu_seconds(self.pid) + lim.cpu_s) + 1
            resource.prlimit(self.pid, resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))
        msg_id = self._kc.execute(code, store_history=True, allow_stdin=False)
        out: list[str] = []
        deadline = time.monotonic() + lim.wall_s
        try:
            done = self._collect(msg_id, out, deadline)
        except KeyboardInterrupt:
            self._interrupt(msg_id, out)
            raise ToolInterrupted(truncate("".join(out), lim.output_chars)) from None
        if done == "dead":
            self.shutdown()
            out.append(f"\n[the kernel died (more than {lim.cpu_s:g} s of CPU time, or out of memory); "
                       "its variables are lost and the next call starts a fresh one]")
        elif done == "timeout":
            if self._interrupt(msg_id, out):
                out.append(f"\n[timed out after {lim.wall_s:g} s: interrupted; the kernel keeps its variables]")
            else:
                self.shutdown()
                out.append(f"\n[timed out after {lim.wall_s:g} s and did not stop: the kernel was restarted, "
                           "its variables are lost]")
        text = "".join(out)
        return truncate(text if text.strip() else "[no output]", lim.output_chars)

    def _collect(self, msg_id: str, out: list[str], deadline: float) -> str:
        """Gather the output of ``msg_id`` until the kernel is idle: "done", "timeout" or "dead"."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            try:
                msg = self._kc.get_iopub_msg(timeout=min(0.25, left))
            except queue.Empty:
                if not self._km.is_alive():
                    return "dead"
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if self._take(msg, out):
                return "done"

    @staticmethod
    def _take(msg: dict, out: list[str]) -> bool:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind in ("execute_result", "display_data"):
            data = content.get("data", {})
            if "text/plain" in data:
                out.append(data["text/plain"] + "\n")
            others = [k for k in data if k != "text/plain"]
            if others:
                out.append(f"[{', '.join(others)} output not shown]\n")
        elif kind == "error":
            out.append(_ANSI.sub("", "\n".join(content.get("traceback") or [f"{content['ename']}: {content['evalue']}"])) + "\n")
        elif kind == "status" and content.get("execution_state") == "idle":
            return True
        return False

    def _interrupt(self, msg_id: str, out: list[str], grace_s: float = 5.0) -> bool:
        """Interrupt the running cell; True when the kernel came back idle within ``grace_s``."""
        try:
            self._km.interrupt_kernel()
            return self._collect(msg_id, out, time.monotonic() + grace_s) == "done"
        except Exception:  # noqa: BLE001 - a kernel gone while we interrupted it
            return False

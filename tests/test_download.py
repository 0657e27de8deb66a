"""``gptoss download`` against a fake Hugging Face hub served on 127.0.0.1 by a thread.

The fake answers the endpoints huggingface_hub 2.x calls (read from its source): the repo listing
``GET /api/{models,datasets}/{id}/revision/{rev}?blobs=true`` (siblings with size, blobId and LFS
sha256), and ``HEAD``/``GET`` of ``/{id}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``,
``X-Linked-Etag``, ``X-Linked-Size`` and ``Range`` support; errors carry ``X-Error-Code``
(RepoNotFound, RevisionNotFound, GatedRepo) as the real hub's do. Nothing here leaves loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from huggingface_hub import constants
from rich.console import Console
from typer.testing import CliRunner

from gptoss_cli import download, hub
from gptoss_cli.checkpoint import Checkpoint
from gptoss_cli.cli import app
from gptoss_cli.config import PRESETS
from gptoss_cli.synthetic import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REPO = "openai/gpt-oss-20b"
# The tiny preset with a small vocabulary: real formats, files of a few hundred kB.
SMALL = PRESETS["tiny"].replace(vocab_size=512)


# ---- the fake hub -------------------------------------------------------------------------------

def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeRepo:
    def __init__(self, files: dict[str, bytes], gated: bool = False, commit: str | None = None):
        self.files = dict(files)
        self.gated = gated
        self.commit = commit or hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        self.lfs = {p for p in files if p.endswith((".safetensors", ".bin"))}
        self.serve: dict[str, bytes] = {}  # path -> bytes served instead of the listed ones (corruption)

    def sibling(self, path: str) -> dict:
        data = self.files[path]
        if path not in self.lfs:
            return {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
        sha = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
        return {"rfilename": path, "size": len(data), "blobId": git_blob_id(pointer),
                "lfs": {"size": len(data), "sha256": sha, "pointerSize": len(pointer)}}

    def etag(self, path: str) -> str:
        s = self.sibling(path)
        return s["lfs"]["sha256"] if "lfs" in s else s["blobId"]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that hangs up mid-file (the tests make them) is not news


class FakeHub:
    """State of the fake hub, shared with its request handler threads."""

    def __init__(self):
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cut_once: dict[str, int] = {}   # path -> close the connection after this many bytes, once
        self.delay: dict[str, float] = {}    # path -> seconds to sleep per 16 kB sent
        self.fail_once: dict[str, int] = {}  # path -> answer the next GET with this status
        self.ignore_range: set[str] = set()  # paths served whole even when a Range is asked
        self.server = _QuietServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", **kw) -> FakeRepo:
        repo = self.repos[(repo_type, repo_id)] = FakeRepo(files, **kw)
        return repo

    def gets(self, path_part: str) -> list[tuple[str, str, str | None]]:
        return [e for e in self.log if e[0] == "GET" and e[1].endswith(path_part) and "/resolve/" in e[1]]

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _handler(state: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self._route(body=False)

        def do_GET(self):
            self._route(body=True)

        def _error(self, status: int, code: str | None, message: str = "") -> None:
            body = json.dumps({"error": message or code or "error"}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            if message:
                self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _repo(self, repo_type: str, repo_id: str, revision: str):
            repo = state.repos.get((repo_type, repo_id))
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            if revision not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return repo

        def _route(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            state.log.append((self.command, path, self.headers.get("Range")))
            m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/(.+))?", path)
            if m:
                repo_type = "model" if m.group(1) == "models" else "dataset"
                repo = self._repo(repo_type, m.group(2), m.group(3) or "main")
                if repo is not None:
                    info = {"id": m.group(2), "sha": repo.commit, "private": False,
                            "gated": "manual" if repo.gated else False,
                            "siblings": [repo.sibling(p) for p in repo.files]}
                    self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                return
            m = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if not m:
                return self._error(404, None, "no such endpoint")
            repo_type = "dataset" if m.group(1) else "model"
            repo = self._repo(repo_type, m.group(2), m.group(3))
            if repo is None:
                return
            if repo.gated:
                auth = self.headers.get("Authorization")
                if auth != "Bearer hf_granted":
                    status = 403 if auth else 401
                    return self._error(status, "GatedRepo", f"Access to {m.group(2)} is restricted.")
            name = m.group(4)
            if name not in repo.files:
                return self._error(404, "EntryNotFound", f"{name} does not exist")
            if body and name in state.fail_once:
                return self._error(state.fail_once.pop(name), None, "busy")
            data = repo.serve.get(name, repo.files[name])
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes"}
            if name in repo.lfs:
                headers["X-Linked-Etag"] = f'"{repo.etag(name)}"'
                headers["X-Linked-Size"] = str(len(repo.files[name]))
            status, start = 200, 0
            rng = self.headers.get("Range")
            if rng and body and name not in state.ignore_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._send(status, data[start:], headers, body, name)

        def _send(self, status, data: bytes, headers: dict, body: bool, name: str | None = None) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not body:
                return
            cut = state.cut_once.pop(name, None) if name else None
            if cut is not None:
                self.wfile.write(data[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            delay = state.delay.get(name) if name else None
            step = 16384 if delay else len(data) or 1
            for i in range(0, len(data), step):
                self.wfile.write(data[i:i + step])
                if delay:
                    self.wfile.flush()
                    time.sleep(delay)

    return Handler


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def repo_files(tmp_path_factory) -> dict[str, bytes]:
    """The files of a gpt-oss repo: both layouts (HF in two shards), tokenizer and chat files,
    ``metal/model.bin``; configs without the random-weights marker, as on the real hub."""
    folder = write_checkpoint(tmp_path_factory.mktemp("repo"), SMALL, layout="both", shards=2, seed=3,
                              tokenizer=False)
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != "README.txt":
            data = p.read_bytes()
            if rel.endswith("config.json"):
                raw = json.loads(data)
                raw.pop("gptoss_random_weights")
                data = json.dumps(raw, indent=2).encode()
            files[rel] = data
    files["tokenizer.json"] = b'{"version": "1.0", "model": {"type": "BPE"}}'
    files["tokenizer_config.json"] = b'{"model_max_length": 131072}'
    files["generation_config.json"] = b'{"eos_token_id": [200002, 199999, 200012]}'
    files["special_tokens_map.json"] = b"{}"
    files["chat_template.jinja"] = b"{{ messages }}"
    files["original/dtypes.json"] = b'{"embedding.weight": "BF16"}'
    files["metal/model.bin"] = os.urandom(50_000)
    files["README.md"] = b"# gpt-oss-20b\n"
    return files


@pytest.fixture
def fake_hub(repo_files):
    with FakeHub() as fh:
        fh.add(REPO, repo_files)
        fh.add("someone/gated-oss", repo_files, gated=True)
        llama = dict(repo_files)
        llama["config.json"] = json.dumps({"model_type": "llama", "hidden_size": 64}).encode()
        fh.add("someone/llama", llama)
        fh.add("opencompass/AIME2025", {"aime2025-I.jsonl": b'{"question": "1+1", "answer": "2"}\n',
                                        "aime2025-II.jsonl": b'{"question": "2+2", "answer": "4"}\n',
                                        "README.md": b"# AIME 2025\n"}, repo_type="dataset")
        fh.add("Idavidrein/gpqa", {"gpqa_diamond.csv": b"Question,Correct Answer\n"}, repo_type="dataset",
               gated=True)
        yield fh


@pytest.fixture
def env(fake_hub, tmp_path, monkeypatch):
    """huggingface_hub pointed at the fake hub, with an empty cache and gptoss home under tmp_path."""
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("GPTOSS_HOME", str(tmp_path / "gptoss"))
    monkeypatch.setenv("COLUMNS", "200")
    real_getaddrinfo = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):  # the tests never reach beyond this machine
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"a test tried to reach {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    return fake_hub


def cli(*args: str):
    return CliRunner().invoke(app, ["download", *args])


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


# ---- choosing files and the plan ----------------------------------------------------------------

def test_plan_lists_one_layout_with_sizes(env, repo_files):
    p = download.plan("gpt-oss-20b", layout="hf")
    paths = [f.path for f in p.files]
    assert paths == ["config.json", "tokenizer.json", "generation_config.json", "tokenizer_config.json",
                     "special_tokens_map.json", "chat_template.jinja", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert p.total_bytes == sum(len(repo_files[x]) for x in paths) == p.to_fetch
    assert p.config.n_layers == SMALL.n_layers
    assert len(p) == 9 and sum(f.size for f in p) == p.total_bytes  # the file list `gptoss chat` shows
    orig = [f.path for f in download.plan("gpt-oss-20b", layout="original").files]
    assert [x for x in orig if "/" in x] == ["original/config.json", "original/dtypes.json", "original/model.safetensors"]
    assert not any(x.startswith("model-") for x in orig)
    both = [f.path for f in download.plan(REPO, layout="both").files]
    assert set(both) == set(paths) | set(orig)
    assert not any(x.startswith("metal/") or x == "README.md" for x in both)
    assert not any("/resolve/" in e[1] and "safetensors" in e[1] for e in env.log)  # planning fetched no weights


def test_cli_shows_plan_downloads_into_cache_and_resolves_offline(env, repo_files, monkeypatch):
    r = cli("gpt-oss-20b", "--yes")
    assert r.exit_code == 0, r.output
    assert "model-00001-of-00002.safetensors" in r.output and "original/" not in r.output
    assert "downloaded and verified" in r.output
    cache = Path(constants.HF_HUB_CACHE) / "models--openai--gpt-oss-20b"
    commit = env.repos[("model", REPO)].commit
    assert (cache / "refs" / "main").read_text() == commit
    snap = cache / "snapshots" / commit
    shard = snap / "model-00001-of-00002.safetensors"
    assert shard.is_symlink() and shard.read_bytes() == repo_files["model-00001-of-00002.safetensors"]
    assert not list(cache.rglob("*.incomplete"))
    Checkpoint.open(snap)  # what Engine.load reads

    # Found again without network: resolve (chat/bench/eval --model), huggingface_hub's own readers.
    from gptoss_cli.resolve import resolve_model
    from huggingface_hub import hf_hub_download, snapshot_download

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model(REPO) == snap and resolve_model("gpt-oss-20b") == snap
    assert Path(snapshot_download(REPO, local_files_only=True)) == snap
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    n = len(env.gets("config.json"))
    assert Path(hf_hub_download(REPO, "config.json")) == snap / "config.json"  # same etag: no new GET
    assert len(env.gets("config.json")) == n

    again = cli("gpt-oss-20b")  # nothing left to fetch: no question, no download
    assert again.exit_code == 0 and "already downloaded" in again.output


def test_pull_into_local_dir_returns_loadable_folder(env, tmp_path, repo_files):
    out = StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    folder = download.pull(REPO, layout="original", local_dir=tmp_path / "m", assume_yes=True, console=console,
                           workers=2)
    assert folder == tmp_path / "m"
    assert (folder / "original" / "model.safetensors").read_bytes() == repo_files["original/model.safetensors"]
    assert not (folder / "model-00001-of-00002.safetensors").exists()
    assert Checkpoint.open(folder).layout == "original"
    meta = (folder / ".cache/huggingface/download/original/model.safetensors.metadata").read_text().split()
    assert meta[0] == env.repos[("model", REPO)].commit
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "total" in text and "100%" in text and "/s" in text  # overall bar with speed


def test_eval_datasets(env):
    r = cli("--eval", "aime25")
    assert r.exit_code == 0, r.output
    folder = download.EVAL_DATASETS["aime25"].folder
    assert folder == Path(os.environ["GPTOSS_HOME"]) / "evals" / "aime25"
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["aime2025-I.jsonl", "aime2025-II.jsonl"]
    assert cli("--eval", "aime25").exit_code == 0  # again: nothing to fetch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        offline = cli("--eval", "aime25")
        assert offline.exit_code == 0 and "using the copy already on disk" in offline.output
    gated = cli("--eval", "gpqa-diamond")
    assert gated.exit_code == 1
    line = one_line_error(gated)
    assert "Idavidrein/gpqa is a gated dataset" in line and "/datasets/Idavidrein/gpqa" in line
    assert "hf auth login" in line
    unknown = cli("--eval", "mmlu")
    assert unknown.exit_code == 1 and "aime25, gpqa-diamond" in one_line_error(unknown)


# ---- refusals -----------------------------------------------------------------------------------

def test_refuses_when_disk_is_too_small(env, monkeypatch):
    monkeypatch.setattr(hub, "free_space", lambda path: 1000)
    r = cli(REPO, "--yes")
    assert r.exit_code == 1
    line = one_line_error(r)
    assert "not enough disk space" in line and "1.0 kB free" in line and "--local-dir" in line
    assert not env.gets(".safetensors")


def test_refuses_folder_holding_another_model(env, tmp_path):
    other = tmp_path / "other"
    write_checkpoint(other, PRESETS["tiny"].replace(vocab_size=512, n_layers=2), layout="hf", tokenizer=False)
    raw = json.loads((other / "config.json").read_text())
    raw.pop("gptoss_random_weights")
    (other / "config.json").write_text(json.dumps(raw))
    r = cli(REPO, "--local-dir", str(other), "--yes")
    assert r.exit_code == 1
    assert "already holds a different model (n_layers 2 there, 4 in openai/gpt-oss-20b)" in one_line_error(r)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    r = cli(REPO, "--local-dir", str(llama), "--yes")
    assert "different model (model_type 'llama')" in one_line_error(r)
    assert not env.gets(".safetensors")


def test_refuses_repo_of_another_architecture(env):
    r = cli("someone/llama", "--yes")
    assert r.exit_code == 1
    assert "someone/llama is not a gpt-oss model" in one_line_error(r)


def test_unknown_repo_revision_and_gated(env):
    r = cli("nobody/nothing", "--yes")
    assert r.exit_code == 1
    line = one_line_error(r)
    assert "no model nobody/nothing on the hub" in line and "hf auth login" in line
    r = cli(REPO, "--revision", "v9", "--yes")
    assert "has no revision 'v9'" in one_line_error(r)
    r = cli("someone/gated-oss", "--yes")
    line = one_line_error(r)
    assert "someone/gated-oss is a gated model" in line and f"{env.url}/someone/gated-oss" in line
    r = cli("bad name/x y", "--yes")
    assert "'bad name/x y' is not a valid hub repo id" in one_line_error(r)
    r = cli("not a model", "--yes")
    assert "not a model gptoss can download" in one_line_error(r)


def test_gated_with_a_token_that_has_access(env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    assert cli("someone/gated-oss", "--yes").exit_code == 0
    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")  # logged in, terms not accepted: 403
    r = cli("someone/gated-oss", "--layout", "original", "--yes")
    assert "is a gated model" in one_line_error(r)


def test_offline_and_unreachable_hub(env, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = cli(REPO, "--yes")
    assert r.exit_code == 1
    line = one_line_error(r)
    assert "model openai/gpt-oss-20b is not on this machine, and offline mode is on (HF_HUB_OFFLINE=1)" in line
    assert "--model FOLDER" in line
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    r = cli(REPO, "--yes")
    assert r.exit_code == 1
    line = one_line_error(r)
    assert "not on this machine, and the Hugging Face hub at http://127.0.0.1:9 cannot be reached" in line
    assert "tiny-random" in line
    assert not env.log


def test_offline_with_a_complete_copy_uses_it(env, monkeypatch):
    assert cli(REPO, "--yes").exit_code == 0
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = cli(REPO)
    assert r.exit_code == 0 and "using the copy already on disk" in r.output
    r = cli(REPO, "--layout", "original")  # that layout was never fetched
    assert r.exit_code == 1 and "offline mode is on" in one_line_error(r)


def test_asks_before_downloading(env, monkeypatch):
    r = cli(REPO)  # CliRunner's stdin is not a terminal
    assert r.exit_code == 1 and "pass --yes" in one_line_error(r)
    monkeypatch.setattr(download, "_confirm", lambda console, q: False)
    r = cli(REPO)
    assert r.exit_code == 1 and "download cancelled" in one_line_error(r)
    assert not env.gets(".safetensors")


# ---- resume and verification --------------------------------------------------------------------

def test_resumes_a_partial_file_from_an_earlier_run(env, repo_files):
    p = download.plan(REPO, layout="original")
    f = p.listing.files["original/model.safetensors"]
    data = repo_files[f.path]
    part = p.target.partial_path(f)
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])
    p = download.plan(REPO, layout="original")
    assert p.have[f.path] == 1000 and p.to_fetch == p.total_bytes - 1000
    r = cli(REPO, "--layout", "original", "--yes")
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output
    assert [e[2] for e in env.gets("original/model.safetensors")] == ["bytes=1000-"]
    assert (p.folder / f.path).read_bytes() == data and not part.exists()


def test_starts_over_when_the_server_ignores_the_range(env, repo_files):
    p = download.plan(REPO, layout="original")
    f = p.listing.files["original/model.safetensors"]
    p.target.partial_path(f).parent.mkdir(parents=True)
    p.target.partial_path(f).write_bytes(repo_files[f.path][:1000])
    env.ignore_range.add(f.path)
    folder = download.pull(REPO, layout="original", assume_yes=True, console=Console(file=StringIO()))
    assert (folder / f.path).read_bytes() == repo_files[f.path]  # not the first 1000 bytes twice
    assert [e[2] for e in env.gets(f.path)] == ["bytes=1000-"]


def test_resumes_after_the_connection_drops(env, repo_files):
    name = "model-00002-of-00002.safetensors"
    env.cut_once[name] = 5000
    folder = download.pull(REPO, assume_yes=True, console=Console(file=StringIO()))
    assert (folder / name).read_bytes() == repo_files[name]
    assert [e[2] for e in env.gets(name)] == [None, "bytes=5000-"]


def test_retries_when_the_hub_is_busy(env, repo_files):
    name = "model-00001-of-00002.safetensors"
    env.fail_once[name] = 503
    folder = download.pull(REPO, assume_yes=True, console=Console(file=StringIO()))
    assert (folder / name).read_bytes() == repo_files[name]
    assert len(env.gets(name)) == 2


def test_reuses_files_fetched_by_huggingface_hub(env, repo_files):
    """A cache filled by hf_hub_download (as `hf download` fills it) counts as downloaded."""
    from huggingface_hub import hf_hub_download

    name = "model-00001-of-00002.safetensors"
    for path in ("config.json", name):
        hf_hub_download(REPO, path)
    p = download.plan(REPO)
    assert p.have[name] == len(repo_files[name]) and p.have["config.json"] == len(repo_files["config.json"])
    assert p.to_fetch == p.total_bytes - len(repo_files[name]) - len(repo_files["config.json"])
    n = len(env.gets(name))
    folder = download.pull(REPO, assume_yes=True, console=Console(file=StringIO()))
    assert len(env.gets(name)) == n
    assert Checkpoint.open(folder).layout == "hf"


def test_local_dir_files_without_metadata_are_checked_not_trusted(env, tmp_path, repo_files):
    folder = tmp_path / "m"
    same, other = "original/model.safetensors", "original/dtypes.json"
    for name, data in ((same, repo_files[same]), (other, b"x" * len(repo_files[other]))):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    p = download.plan(REPO, layout="original", local_dir=folder)
    assert p.have[same] == len(repo_files[same])
    download.pull(REPO, layout="original", local_dir=folder, assume_yes=True, console=Console(file=StringIO()))
    assert not env.gets(same)  # same bytes: hashed, kept
    assert (folder / other).read_bytes() == repo_files[other]  # same size, other bytes: replaced


def test_files_with_the_same_content_share_a_blob(env, repo_files):
    files = dict(repo_files)
    files["tokenizer_config.json"] = files["special_tokens_map.json"] = files["generation_config.json"] = b"{}"
    env.add("someone/dupes", files)
    folder = download.pull("someone/dupes", assume_yes=True, console=Console(file=StringIO()))
    links = {os.readlink(folder / n) for n in ("tokenizer_config.json", "special_tokens_map.json",
                                                "generation_config.json")}
    assert len(links) == 1 and (folder / "special_tokens_map.json").read_bytes() == b"{}"


def test_sha256_mismatch_is_caught_and_the_file_dropped(env, repo_files):
    name = "model-00001-of-00002.safetensors"
    bad = bytearray(repo_files[name])
    bad[-1] ^= 0xFF
    env.repos[("model", REPO)].serve[name] = bytes(bad)
    r = cli(REPO, "--yes")
    assert r.exit_code == 1
    line = one_line_error(r)
    assert f"{name}: sha256 mismatch" in line and "run the same command again" in line
    cache = Path(constants.HF_HUB_CACHE) / "models--openai--gpt-oss-20b"
    assert not (cache / "refs" / "main").exists()  # an incomplete snapshot is not published
    assert not list(cache.rglob(f"*{hashlib.sha256(repo_files[name]).hexdigest()}*"))
    del env.repos[("model", REPO)].serve[name]
    assert cli(REPO, "--yes").exit_code == 0


def test_disk_full_during_download(env, monkeypatch):
    import errno

    class FullDisk:  # the file object's write fails as on a full disk, for the weights only
        def __init__(self, fh):
            self.fh = fh

        def write(self, chunk):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = hub._write
    monkeypatch.setattr(hub, "_write", lambda fh, chunk, f, t: real(fh if f.size < 10_000 else FullDisk(fh), chunk, f, t))
    r = cli(REPO, "--yes")
    assert r.exit_code == 1
    assert "disk full while writing" in one_line_error(r)


def _subprocess_env(fake_hub, tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "hf-cache"),
               HF_ENDPOINT=fake_hub.url, HF_HUB_OFFLINE="0", GPTOSS_HOME=str(tmp_path / "gptoss"),
               COLUMNS="200", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def test_ctrl_c_keeps_the_partial_download_and_the_next_run_resumes(fake_hub, tmp_path, repo_files):
    """A real process, a real SIGINT in the middle of a slow weight file."""
    name = "original/model.safetensors"
    fake_hub.delay[name] = 0.05
    target = tmp_path / "m"
    cmd = [sys.executable, "-m", "gptoss_cli.cli", "download", REPO, "--layout", "original",
           "--local-dir", str(target), "--yes"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_subprocess_env(fake_hub, tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = None
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        parts = list((target / ".cache").rglob("model.safetensors.*.incomplete")) if (target / ".cache").exists() else []
        if parts and parts[0].stat().st_size > 50_000:  # only the slow weight file is still partial here
            partial = parts[0]
            break
        time.sleep(0.05)
    assert partial is not None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "download interrupted" in lines[0] and "run the same command again" in lines[0]
    kept = partial.stat().st_size
    assert 0 < kept < len(repo_files[name])

    del fake_hub.delay[name]
    done = subprocess.run(cmd, cwd=ROOT, env=_subprocess_env(fake_hub, tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert fake_hub.gets(name)[-1][2] == f"bytes={kept}-"
    assert (target / name).read_bytes() == repo_files[name]


def test_environment_variables_offline_and_unreachable(fake_hub, tmp_path):
    """HF_HUB_OFFLINE=1 and an HF_ENDPOINT that refuses connections, set as users set them."""
    cmd = [sys.executable, "-m", "gptoss_cli.cli", "download", "gpt-oss-20b", "--yes"]
    off = subprocess.run(cmd, cwd=ROOT, env=_subprocess_env(fake_hub, tmp_path, HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=60)
    assert off.returncode == 1 and "offline mode is on" in off.stderr and "Traceback" not in off.stderr
    down = subprocess.run(cmd, cwd=ROOT, env=_subprocess_env(fake_hub, tmp_path, HF_ENDPOINT="http://127.0.0.1:9"),
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "the Hugging Face hub at http://127.0.0.1:9 cannot be reached" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1
    assert not fake_hub.log


# ---- tiny-random and --list ---------------------------------------------------------------------

@pytest.mark.slow  # writing tokenizer.json from o200k's ranks takes ~7 s of CPU
def test_tiny_random_offline_and_list(env, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = cli("tiny-random")
    assert r.exit_code == 0, r.output
    assert "RANDOM weights" in r.output and "noise" in r.output
    folder = Path(os.environ["GPTOSS_HOME"]) / "models" / "tiny-random"
    from gptoss_cli.config import ModelConfig
    from gptoss_cli.resolve import resolve_model

    assert resolve_model("tiny-random") == folder
    assert ModelConfig.from_file(folder / "config.json").random_weights
    assert Checkpoint.open(folder).config.n_layers == PRESETS["tiny"].n_layers
    from gptoss_cli.tokenizer import load_encoding

    enc = load_encoding(folder)  # the tokenizer.json written beside the weights
    assert enc.decode(enc.encode("hello world")) == "hello world"
    assert not env.log

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert cli(REPO, "--yes").exit_code == 0
    models = download.list_local()
    assert [(m.name, m.source, m.random_weights) for m in models] == [
        (REPO, "hf-cache", False), ("tiny-random", "gptoss", True)]
    assert models[0].layouts == ("hf",) and models[1].layouts == ("hf", "original")
    assert models[0].size == sum(f.size for f in download.plan(REPO).files)
    listing = cli("--list")
    assert listing.exit_code == 0
    assert REPO in listing.output and "tiny-random" in listing.output and "random weights" in listing.output


@pytest.mark.parametrize("where", ["local-dir", "home"])
def test_tiny_random_into_a_folder_that_cannot_be_made(where, env, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    if where == "home":
        monkeypatch.setenv("GPTOSS_HOME", str(blocker / "home"))
        r = cli("tiny-random")
    else:
        r = cli("tiny-random", "--local-dir", str(blocker / "tiny"))
    assert r.exit_code == 1
    line = one_line_error(r)
    assert "cannot write to" in line and "a-file is a file, not a folder" in line
    assert ("--local-dir" if where == "local-dir" else "GPTOSS_HOME") in line


def test_download_into_a_folder_that_cannot_be_made_stops_before_fetching(env, tmp_path):
    (tmp_path / "a-file").write_text("x")
    r = cli(REPO, "--yes", "--local-dir", str(tmp_path / "a-file" / "model"))
    assert r.exit_code == 1
    line = one_line_error(r)
    assert "a-file is a file, not a folder" in line and "--local-dir" in line
    assert not env.gets(".safetensors")  # no weight file was requested


def test_list_when_nothing_is_on_disk(env):
    r = cli("--list")
    assert r.exit_code == 0 and "no gpt-oss model on disk yet" in r.output


def test_chat_offers_the_download_then_answers(fake_hub, tmp_path):
    """`gptoss chat` with no model on disk: shows the plan, fetches (--yes), loads, answers; and
    without --yes and without a terminal it says, in one line, what to do."""
    folder = write_checkpoint(tmp_path / "repo", PRESETS["tiny"], layout="hf", seed=4)  # real vocabulary
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    fake_hub.add("openai/gpt-oss-chat", files)
    chat = [sys.executable, "-m", "gptoss_cli", "chat", "--model", "openai/gpt-oss-chat", "--prompt", "hi",
            "--max-tokens", "4", "--json", "--device", "cpu"]
    refused = subprocess.run(chat, cwd=ROOT, env=_subprocess_env(fake_hub, tmp_path), capture_output=True,
                             text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--yes" in errors[0], refused.stderr
    r = subprocess.run(chat + ["--yes"], cwd=ROOT, env=_subprocess_env(fake_hub, tmp_path),
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "downloaded and verified" in r.stderr
    out = json.loads(r.stdout)                       # stdout holds the answer only; progress is on stderr
    assert out["stats"]["generated_tokens"] == 4

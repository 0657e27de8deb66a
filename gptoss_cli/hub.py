"""Fetching files of a Hugging Face hub repository: resumable, verified, in huggingface_hub's layout.

Why not ``hf_hub_download``: since huggingface_hub 2.x each download streams into a temporary file
with a random name that is deleted when the download fails, so an interrupted 13 GB download starts
again from zero. Here a repository is listed once (``repo_info`` with ``files_metadata``: size, git
blob id and, for LFS files, sha256 of every file), then each file is fetched with a plain GET of its
``resolve/{commit}/{path}`` URL into a partial file of a stable name, resuming with a ``Range``
header and hashing as it streams. A file is moved into place only once its size and its hash (the
LFS sha256 for weights, the git blob sha1 for small files) match the listing.

Files land where huggingface_hub itself puts them, so its readers (``snapshot_download(
local_files_only=True)``, ``hf_hub_download``, ``scan_cache_dir``) and ``resolve.py`` see them:

- cache: ``<HF_HUB_CACHE>/models--org--name/blobs/<etag>``, ``snapshots/<commit>/<path>`` a relative
  symlink to the blob, ``refs/<revision>`` written once every file is in place; partial data in
  ``blobs/<etag>.incomplete`` (huggingface_hub's own temporary names carry a random suffix);
- folder (``--local-dir``): ``<dir>/<path>``, with ``<dir>/.cache/huggingface/download/<path>.metadata``
  (commit, etag, time: the format huggingface_hub reads) and partial data beside it.

Network, authentication and disk problems become ``GptossError``s worded for the user
(``hub_error``). This module prints nothing: progress goes to a ``Progress`` callback object.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from .errors import GptossError

CHUNK = 1 << 20        # bytes per read from the network and per progress update
RETRIES = 5            # attempts per file that may fail in a row without receiving a byte


class HubError(GptossError):
    """The hub could not be reached, refused access, or has no such repository or revision."""


class HubUnreachable(HubError):
    """No network, offline mode, or an endpoint that does not answer."""

    def __init__(self, message: str, hint: str | None = None, reason: str | None = None):
        super().__init__(message, hint)
        self.reason = reason or message  # why, without the subject: "offline mode is on (...)"


class DiskSpaceError(GptossError):
    """Not enough free space for the download, or the disk filled up during it."""


class VerificationError(GptossError):
    """A downloaded file does not have the size or hash the hub lists for it."""


class DownloadInterrupted(GptossError, KeyboardInterrupt):
    """Ctrl-C during a download: the partial files are kept and the next run resumes them.

    Also a ``KeyboardInterrupt``, so a caller that handles Ctrl-C (``gptoss chat``) still sees one.
    """

    exit_code = 130


# ---- the repository listing --------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    path: str                  # relative to the repo root, "/"-separated
    size: int
    blob_id: str | None        # git object id (sha1 of the blob, or of the LFS pointer)
    sha256: str | None = None  # LFS files only

    @property
    def etag(self) -> str:
        """The name huggingface_hub gives the blob: the sha256 for LFS files, else the git id."""
        return self.sha256 or self.blob_id or ""


@dataclass(frozen=True)
class RepoListing:
    repo_id: str
    repo_type: str             # "model" or "dataset"
    revision: str              # what the user asked for ("main", a tag, a commit)
    commit: str                # the commit it resolved to
    files: dict[str, RemoteFile]

    @property
    def web_url(self) -> str:
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        return f"{endpoint()}/{prefix}{self.repo_id}"


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's errors for a connection that fails (httpx or httpx2, whichever
    huggingface_hub uses), plus the OS's."""
    from huggingface_hub.utils import get_session

    client = sys.modules[type(get_session()).__module__.split(".")[0]]
    return (client.TransportError, ConnectionError, TimeoutError)


def list_repo(repo_id: str, revision: str | None = None, repo_type: str = "model") -> RepoListing:
    """Every file of ``repo_id`` at ``revision`` with its size and hashes (one API call)."""
    from huggingface_hub import HfApi, constants

    revision = revision or "main"
    try:
        info = HfApi(endpoint=endpoint()).repo_info(
            repo_id, revision=revision, repo_type=repo_type, files_metadata=True,
            timeout=constants.HF_HUB_ETAG_TIMEOUT,
        )
    except Exception as e:
        raise hub_error(e, repo_id, repo_type, revision) from None
    files = {}
    for s in info.siblings or []:
        _check_relative(s.rfilename, repo_id)
        lfs = s.lfs
        files[s.rfilename] = RemoteFile(
            path=s.rfilename,
            size=int(lfs.size if lfs else (s.size or 0)),
            blob_id=s.blob_id,
            sha256=lfs.sha256 if lfs else None,
        )
    return RepoListing(repo_id, repo_type, revision, info.sha, files)


def _check_relative(path: str, repo_id: str) -> None:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise HubError(f"{repo_id} lists an unsafe file name {path!r}", "refusing to download from it")


def _url(listing: RepoListing, f: RemoteFile) -> str:
    prefix = "datasets/" if listing.repo_type == "dataset" else ""
    return f"{endpoint()}/{prefix}{listing.repo_id}/resolve/{listing.commit}/{quote(f.path)}"


def _headers() -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers(library_name="gptoss")


def fetch_bytes(listing: RepoListing, path: str) -> bytes:
    """A small file's content, verified, without writing it anywhere."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    f = listing.files[path]
    try:
        r = get_session().get(_url(listing, f), headers=_headers(), timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
        hf_raise_for_status(r)
    except Exception as e:
        raise hub_error(e, listing.repo_id, listing.repo_type, listing.revision) from None
    data = r.content
    h = _hasher(f)
    h.update(data)
    _verify(f, len(data), h, Path(path))
    return data


# ---- where files go ----------------------------------------------------------------------------

class CacheTarget:
    """The Hugging Face cache, laid out as huggingface_hub writes it."""

    def __init__(self, listing: RepoListing, cache_dir: Path | None = None):
        from huggingface_hub.file_download import repo_folder_name

        self.listing = listing
        self.root = Path(cache_dir or cache_root()) / repo_folder_name(
            repo_id=listing.repo_id, repo_type=listing.repo_type
        )
        self.folder = self.root / "snapshots" / listing.commit

    def final_path(self, f: RemoteFile) -> Path:
        return self.folder / f.path

    def partial_path(self, f: RemoteFile) -> Path:
        return self.root / "blobs" / f"{f.etag}.incomplete"

    def have(self, f: RemoteFile) -> int:
        """Bytes of ``f`` already on disk (``f.size`` when complete)."""
        blob = self.root / "blobs" / f.etag
        if self.final_path(f).exists() or (blob.is_file() and blob.stat().st_size == f.size):
            return f.size
        part = self.partial_path(f)
        return part.stat().st_size if part.is_file() else 0

    def place(self, f: RemoteFile, data: Path | None) -> None:
        """Move verified ``data`` into the blob store (None: the blob is already there) and link
        the snapshot's file to it."""
        blob = self.root / "blobs" / f.etag
        if data is not None:
            os.replace(data, blob)
        pointer = self.final_path(f)
        if pointer.exists():
            return
        pointer.parent.mkdir(parents=True, exist_ok=True)
        try:
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        except OSError:  # no symlinks (Windows without developer mode): keep a copy, as huggingface_hub does
            shutil.copyfile(blob, pointer)

    def unverified(self, f: RemoteFile) -> bool:
        return False  # a blob's name is its hash: it was verified when it was written

    def finish(self) -> None:
        """Point ``refs/<revision>`` at the commit, now that its files are in place."""
        rev = self.listing.revision
        if rev != self.listing.commit:
            ref = self.root / "refs" / rev
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(self.listing.commit)


class FolderTarget:
    """A plain folder (``--local-dir``), with huggingface_hub's download metadata beside it."""

    def __init__(self, listing: RepoListing, folder: Path):
        self.listing = listing
        self.root = self.folder = Path(folder)

    def _meta_dir(self) -> Path:
        return self.folder / ".cache" / "huggingface" / "download"

    def final_path(self, f: RemoteFile) -> Path:
        return self.folder / f.path

    def partial_path(self, f: RemoteFile) -> Path:
        return self._meta_dir() / f"{f.path}.{f.etag}.incomplete"

    def _metadata(self, f: RemoteFile) -> Path:
        return self._meta_dir() / f"{f.path}.metadata"

    def _recorded_etag(self, f: RemoteFile) -> str | None:
        meta = self._metadata(f)
        lines = meta.read_text().splitlines() if meta.is_file() else []
        return lines[1].strip() if len(lines) >= 2 else None

    def have(self, f: RemoteFile) -> int:
        final = self.final_path(f)
        # A file of the right size with no metadata (copied here, or fetched by another tool) counts
        # as present; ``fetch_one`` hashes it before trusting it.
        if final.is_file() and final.stat().st_size == f.size and self._recorded_etag(f) in (f.etag, None):
            return f.size
        part = self.partial_path(f)
        return part.stat().st_size if part.is_file() else 0

    def unverified(self, f: RemoteFile) -> bool:
        return self._recorded_etag(f) != f.etag

    def place(self, f: RemoteFile, data: Path | None) -> None:
        final = self.final_path(f)
        if data is not None:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(data, final)
        meta = self._metadata(f)
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(f"{self.listing.commit}\n{f.etag}\n{time.time()}\n")

    def finish(self) -> None:
        pass


def free_space(path: Path) -> int:
    """Free bytes on the disk that holds ``path`` (or would: the nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# ---- fetching ----------------------------------------------------------------------------------

class Progress(Protocol):
    def start(self, f: RemoteFile, have: int) -> None: ...
    def advance(self, f: RemoteFile, n: int) -> None: ...
    def done(self, f: RemoteFile) -> None: ...


class _NoProgress:
    def start(self, f, have): pass
    def advance(self, f, n): pass
    def done(self, f): pass


def _hasher(f: RemoteFile):
    """sha256 for LFS files; for small files git's blob id, sha1("blob <size>\\0" + content)."""
    if f.sha256:
        return hashlib.sha256()
    h = hashlib.sha1()
    h.update(f"blob {f.size}\0".encode())
    return h


def _verify(f: RemoteFile, size: int, h, where: Path) -> None:
    if size != f.size:
        raise VerificationError(
            f"{f.path}: received {size} bytes, the hub lists {f.size}",
            "the partial file was deleted; run the same command again",
        )
    expected = f.sha256 or f.blob_id
    if expected and h.hexdigest() != expected:
        kind = "sha256" if f.sha256 else "git blob id"
        raise VerificationError(
            f"{f.path}: {kind} mismatch (got {h.hexdigest()[:12]}..., the hub lists {expected[:12]}...)",
            "the corrupt file was deleted; run the same command again",
        )


def fetch_one(listing: RepoListing, f: RemoteFile, target, progress: Progress, stop: threading.Event) -> bool:
    """Fetch ``f`` into ``target``, resuming its partial file; False if ``stop`` was set first."""
    present = _already_there(f, target, stop)
    if present is None:
        return False
    if present:
        target.place(f, None)
        progress.start(f, f.size)
        progress.done(f)
        return True
    part = target.partial_path(f)
    part.parent.mkdir(parents=True, exist_ok=True)
    h = _hasher(f)
    have = 0
    if part.is_file():
        if part.stat().st_size > f.size:
            part.unlink()
        else:
            have = _hash_file(part, h, stop)  # what an earlier run fetched
            if have is None:
                return False
    progress.start(f, have)
    have, h = _stream(listing, f, part, h, have, progress, stop)
    if have is None:
        return False
    try:
        _verify(f, have, h, part)
    except VerificationError:
        part.unlink(missing_ok=True)  # complete but wrong: resuming it cannot help
        raise
    target.place(f, part)
    progress.done(f)
    return True


def _already_there(f: RemoteFile, target, stop: threading.Event) -> bool | None:
    """Whether ``f`` is complete in ``target`` (hashing a file nobody recorded); None if stopped."""
    final = target.final_path(f)
    if target.have(f) != f.size or target.partial_path(f).exists():
        return False
    if not target.unverified(f):
        return True
    h = _hasher(f)
    if _hash_file(final, h, stop) is None:
        return None
    if h.hexdigest() == (f.sha256 or f.blob_id):
        return True
    final.unlink()  # another version of the file: fetch the hub's
    return False


def _stream(listing: RepoListing, f: RemoteFile, part: Path, h, have: int, progress: Progress,
            stop: threading.Event):
    """Append the rest of ``f`` to ``part`` from byte ``have`` on (``h`` holds the hash so far),
    retrying dropped connections and busy answers. Returns the bytes now in ``part`` (None if
    ``stop`` was set) and the hash of them."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    failures = 0
    while have < f.size:
        headers = _headers()
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with get_session().stream("GET", _url(listing, f), headers=headers,
                                      timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
                if r.status_code >= 400:
                    r.read()  # the error's body, for hf_raise_for_status
                hf_raise_for_status(r)
                if have and r.status_code != 206:  # the server ignored the Range: start over
                    progress.advance(f, -have)
                    part.unlink()
                    h, have = _hasher(f), 0
                with part.open("ab") as fh:
                    for chunk in r.iter_bytes():  # as the network delivers them: prompt Ctrl-C, smooth bars
                        if stop.is_set():
                            return None, h
                        _write(fh, chunk, f, part)
                        h.update(chunk)
                        have += len(chunk)
                        failures = 0
                        progress.advance(f, len(chunk))
                        if have > f.size:
                            return have, h
        except GptossError:
            raise
        except Exception as e:
            failures += 1
            if not _transient(e) or failures >= RETRIES or stop.is_set():
                raise hub_error(e, listing.repo_id, listing.repo_type, listing.revision) from None
            time.sleep(min(0.2 * 2 ** failures, 4))
            continue
        if have < f.size:  # the body ended early without an error: ask for the rest
            failures += 1
            if failures >= RETRIES:
                raise HubUnreachable(
                    f"the connection kept dropping while fetching {f.path} ({have} of {f.size} bytes kept)",
                    "run the same command again to resume",
                )
    return have, h


def _hash_file(path: Path, h, stop: threading.Event) -> int | None:
    """Feed ``path`` to ``h``; its size, or None if ``stop`` was set meanwhile."""
    n = 0
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            if stop.is_set():
                return None
            h.update(block)
            n += len(block)
    return n


def _transient(e: BaseException) -> bool:
    """Worth another try: a dropped connection, a timeout, or the hub/CDN busy or failing."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(e, HfHubHTTPError) and e.response is not None:
        return e.response.status_code in (408, 429, 500, 502, 503, 504)
    return isinstance(e, _transport_errors())


def _write(fh, chunk: bytes, f: RemoteFile, part: Path) -> None:
    try:
        fh.write(chunk)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskSpaceError(
                f"disk full while writing {f.path} into {part.parent}",
                "free some space (the partial download is kept and resumes) or use --local-dir on another disk",
            ) from None
        raise


def fetch_all(listing: RepoListing, files: list[RemoteFile], target, progress: Progress | None = None,
              workers: int = 4) -> None:
    """Fetch ``files`` (a few at a time), then write the ref. On Ctrl-C or on the first error the
    other downloads stop after their current chunk, keeping their partial files."""
    progress = progress or _NoProgress()
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="gptoss-download")
    # Files with the same content share a blob (and its partial file) in the cache: fetch one of
    # them, link the others afterwards.
    first, later, seen = [], [], set()
    for f in files:
        (later if target.partial_path(f) in seen else first).append(f)
        seen.add(target.partial_path(f))
    futures = [pool.submit(fetch_one, listing, f, target, progress, stop) for f in first]
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None:
                    raise fut.exception()
        for f in later:
            fetch_one(listing, f, target, progress, stop)
    except BaseException as e:
        stop.set()
        for fut in futures:
            fut.cancel()
        pool.shutdown(wait=True)
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, GptossError):
            raise DownloadInterrupted(
                f"download interrupted; what was fetched is kept in {target.root}",
                "run the same command again to resume",
            ) from None
        raise
    pool.shutdown(wait=True)
    target.finish()


# ---- errors ------------------------------------------------------------------------------------

def hub_error(e: BaseException, repo_id: str, repo_type: str = "model", revision: str | None = None) -> GptossError:
    """One line (and a hint) for what went wrong talking to the hub."""
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kind = "dataset" if repo_type == "dataset" else "model"
    have = ("pass --model FOLDER to use a checkpoint on disk" if kind == "model"
            else "give gptoss eval a copy you have as NAME=PATH")
    page = f"{endpoint()}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, OfflineModeIsEnabled):
        reason = "offline mode is on (HF_HUB_OFFLINE=1)"
        return HubUnreachable(
            f"cannot download {repo_id}: {reason}",
            f"unset HF_HUB_OFFLINE to download, or {have}"
            + ("; `gptoss download --list` shows what is there" if kind == "model" else ""),
            reason,
        )
    if isinstance(e, HFValidationError):
        return HubError(f"{repo_id!r} is not a valid hub repo id", "a hub id looks like openai/gpt-oss-20b")
    if isinstance(e, GatedRepoError):
        return HubError(
            f"{repo_id} is a gated {kind} and this account has no access to it",
            f"accept its terms at {page}, then {login}",
        )
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{kind} {repo_id} has no revision {revision!r}", "check --revision (a branch, tag or commit)")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(
            f"no {kind} {repo_id} on the hub (or it is private and you are not logged in)",
            f"check the name, e.g. openai/gpt-oss-20b; for a private repo {login}",
        )
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        if status == 401:
            return HubError(f"the hub rejected your token for {repo_id} (401)", f"{login} again")
        if status == 403:
            return HubError(f"access to {repo_id} is forbidden (403)", f"your token may lack read access; {login}")
        return HubError(f"the hub answered {status} for {repo_id}", "try again later; a partial download resumes")
    if isinstance(e, _transport_errors()):
        reason = f"the Hugging Face hub at {endpoint()} cannot be reached ({str(e).strip() or type(e).__name__})"
        return HubUnreachable(
            f"cannot download {repo_id}: {reason}",
            f"check your network, proxy or HF_ENDPOINT; or {have}"
            + (", or try gptoss offline with `gptoss download tiny-random`" if kind == "model" else ""),
            reason,
        )
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskSpaceError("disk full", "free some space; the partial download is kept and resumes")
    return HubError(f"download of {repo_id} failed: {type(e).__name__}: {e}")

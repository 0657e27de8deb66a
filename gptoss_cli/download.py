"""``gptoss download``: fetch gpt-oss from the Hugging Face hub the way its users expect.

What it knows about the gpt-oss repositories (openai/gpt-oss-20b, openai/gpt-oss-120b): the root
holds the HF layout (``config.json``, ``model-0000N-of-0000M.safetensors`` shards and their
``model.safetensors.index.json``) beside the tokenizer and chat files; ``original/`` holds OpenAI's
layout (``config.json``, ``dtypes.json``, ``model.safetensors`` or ``model--0000N-of-0000M`` shards);
20b also has ``metal/model.bin``, which is never fetched. One weight layout is fetched, not both,
unless asked (``--layout both``).

Here: choosing the files (``select_files``), the plan shown before anything is fetched (``plan``),
refusals (disk space, a folder holding another model, a repo of another architecture), the Rich
progress display, ``--list``, ``tiny-random`` (a random checkpoint written offline) and the eval
data sets (``--eval``). The fetching itself (resume, verification, errors) is ``hub.py``'s.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from . import hub
from .config import PRESETS, ModelConfig
from .errors import CheckpointError, GptossError, why_not_written
from .resolve import data_dir, local_models_dir, repo_for

TINY_RANDOM = "tiny-random"
LAYOUTS = ("hf", "original", "both")
REQUIRED_FILES = ("config.json", "tokenizer.json")
# Small files at the repo root fetched with either layout when the repo has them.
ROOT_FILES = REQUIRED_FILES + (
    "generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
)
# Fields that must agree for two checkpoints to be the same model.
SHAPE_FIELDS = ("n_layers", "n_experts", "n_experts_per_token", "vocab_size", "d_model", "d_ff",
                "d_head", "n_heads", "n_kv_heads")


@dataclass(frozen=True)
class EvalDataset:
    name: str
    repo: str                  # hub dataset id
    files: tuple[str, ...]     # paths in the dataset repo, kept as they are in ``folder``
    gated: bool = False

    @property
    def folder(self) -> Path:
        """Where ``gptoss download --eval NAME`` puts the files (read at call time: honours GPTOSS_HOME)."""
        return data_dir() / "evals" / self.name


EVAL_DATASETS: dict[str, EvalDataset] = {
    "aime25": EvalDataset("aime25", "opencompass/AIME2025", ("aime2025-I.jsonl", "aime2025-II.jsonl")),
    "gpqa-diamond": EvalDataset("gpqa-diamond", "Idavidrein/gpqa", ("gpqa_diamond.csv",), gated=True),
}


# ---- choosing files -----------------------------------------------------------------------------

def select_files(listing: hub.RepoListing, layout: str) -> list[hub.RemoteFile]:
    """The files of ``listing`` a checkpoint of ``layout`` needs, from the repo's own list."""
    if layout not in LAYOUTS:
        raise GptossError(f"unknown layout {layout!r}", "use --layout hf or --layout original")
    names = listing.files
    for required in REQUIRED_FILES:
        if required not in names:
            raise GptossError(
                f"{listing.repo_id} has no {required} at its root: not a gpt-oss repository in the hub's layout",
                "pass a repo like openai/gpt-oss-20b",
            )
    chosen = [p for p in ROOT_FILES if p in names]
    weights: list[str] = []
    if layout in ("hf", "both"):
        hf = [p for p in names if "/" not in p and p.endswith(".safetensors")]
        weights += hf + (["model.safetensors.index.json"] if hf and "model.safetensors.index.json" in names else [])
        if not hf:
            raise GptossError(f"{listing.repo_id} has no HF-layout weights (*.safetensors at its root)",
                              "try --layout original")
    if layout in ("original", "both"):
        orig = [p for p in names if p.startswith("original/")]
        if not any(p.endswith(".safetensors") for p in orig) or "original/config.json" not in orig:
            raise GptossError(f"{listing.repo_id} has no original/ layout (original/config.json and weights)",
                              "try --layout hf")
        weights += orig
    return [names[p] for p in chosen + sorted(weights)]


# ---- the plan -----------------------------------------------------------------------------------

@dataclass
class Plan:
    """What ``pull`` will fetch: the files with their sizes (iterating a Plan gives them) and what
    is already on disk."""

    listing: hub.RepoListing
    layout: str
    target: hub.CacheTarget | hub.FolderTarget
    files: list[hub.RemoteFile]
    have: dict[str, int]          # path -> bytes already on disk (complete or partial)
    config: ModelConfig           # the repo's config.json

    # A Plan is also the list of its files (``len(plan)``, ``sum(f.size for f in plan)``).
    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        return self.files[i]

    @property
    def repo_id(self) -> str:
        return self.listing.repo_id

    @property
    def folder(self) -> Path:
        """The folder ``Engine.load`` will be given once the download is complete."""
        return self.target.folder

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def to_fetch(self) -> int:
        return sum(f.size - self.have[f.path] for f in self.files)


def repo_id_for(model: str) -> str:
    repo = repo_for(model)
    if repo is None:
        raise GptossError(
            f"{model!r} is not a model gptoss can download",
            "use gpt-oss-20b, gpt-oss-120b, a hub repo id like openai/gpt-oss-20b, or tiny-random",
        )
    return repo


def plan(model: str = "gpt-oss-20b", *, layout: str = "hf", local_dir: Path | None = None,
         revision: str | None = None) -> Plan:
    """List the repo and decide what to fetch (network: two small requests, nothing written).

    Refuses a repo that is not a gpt-oss model, and a ``local_dir`` that holds another model."""
    repo = repo_id_for(model)
    if layout not in LAYOUTS:
        raise GptossError(f"unknown layout {layout!r}", "use --layout hf or --layout original")
    try:
        listing = hub.list_repo(repo, revision)
    except hub.HubUnreachable as e:
        if on_disk(model, layout=layout, local_dir=local_dir, revision=revision) is None:
            raise hub.HubUnreachable(f"model {repo} is not on this machine, and {e.reason}", e.hint,
                                     e.reason) from None
        raise
    files = select_files(listing, layout)
    raw = _json(hub.fetch_bytes(listing, "config.json"), f"{repo}/config.json")
    try:
        config = ModelConfig.from_dict(raw, source=f"{repo}/config.json")
    except CheckpointError as e:
        raise GptossError(f"{repo} is not a gpt-oss model: {e.message}", "gptoss runs only gpt-oss checkpoints") from None
    if local_dir is not None:
        check_same_model(Path(local_dir), config, repo)
        target: hub.CacheTarget | hub.FolderTarget = hub.FolderTarget(listing, Path(local_dir))
    else:
        target = hub.CacheTarget(listing)
    return Plan(listing, layout, target, files, {f.path: target.have(f) for f in files}, config)


def _json(data: bytes, source: str) -> dict:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptossError(f"{source} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise GptossError(f"{source} is not a JSON object")
    return raw


def check_same_model(folder: Path, config: ModelConfig, repo: str) -> None:
    """Refuse to download ``repo`` into a folder that already holds a different model."""
    found = [p for p in (folder / "config.json", folder / "original" / "config.json") if p.is_file()]
    if not found:
        return
    hint = "choose another --local-dir, or empty that folder first"
    try:
        raw = json.loads(found[0].read_text())
    except (OSError, ValueError):
        raw = None
    try:
        here = ModelConfig.from_dict(raw, source=str(found[0])) if isinstance(raw, dict) else None
    except CheckpointError:
        here = None
    if here is None:
        what = raw.get("model_type") if isinstance(raw, dict) else None
        desc = f"model_type {what!r}" if what else "a config.json that is not gpt-oss"
        raise GptossError(f"{folder} already holds a different model ({desc}), not {repo}", hint)
    if here.random_weights:
        raise GptossError(f"{folder} already holds random weights (gptoss download tiny-random), not {repo}", hint)
    for name in SHAPE_FIELDS:
        a, b = getattr(here, name), getattr(config, name)
        if a != b:
            raise GptossError(f"{folder} already holds a different model ({name} {a} there, {b} in {repo})", hint)


# ---- pull: the download itself ------------------------------------------------------------------

def _size(n: int) -> str:
    from rich.filesize import decimal

    return decimal(n)


def show_plan(p: Plan, console) -> None:
    """The files, their sizes, what is on disk, and where it goes."""
    from rich.table import Table

    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("on disk", justify="right")
    for f in p.files:
        have = p.have[f.path]
        state = "yes" if have == f.size else (_size(have) if have else "")
        table.add_row(f.path, _size(f.size), state)
    short = p.listing.commit[:10]
    console.print(f"[bold]{p.repo_id}[/] @ {p.listing.revision} ({short}), layout {p.layout}: "
                  f"{len(p.files)} files, {_size(p.total_bytes)}")
    console.print(table)


def pull(model: str = "gpt-oss-20b", *, layout: str = "hf", local_dir: Path | None = None,
         revision: str | None = None, assume_yes: bool = False, console=None, workers: int = 4) -> Path:
    """Download ``model`` (showing the plan, checking disk space, asking unless ``assume_yes``) and
    return the folder ``Engine.load`` accepts. Offline, a complete copy already on disk is returned."""
    from rich.console import Console

    console = console or Console(highlight=False)
    try:
        p = plan(model, layout=layout, local_dir=local_dir, revision=revision)
    except hub.HubUnreachable as e:
        existing = on_disk(model, layout=layout, local_dir=local_dir, revision=revision)
        if existing is None:
            raise
        console.print(f"[yellow]{escape(e.message)}[/]: using the copy already on disk, {escape(str(existing))}",
                      soft_wrap=True)
        return existing
    show_plan(p, console)
    need = p.to_fetch
    if need == 0:
        hub.fetch_all(p.listing, p.files, p.target)  # links the snapshot and writes the ref, if missing
        console.print(f"[green]already downloaded:[/] {escape(str(p.folder))}", soft_wrap=True)
        return p.folder
    check_writable(p.target.root, "--local-dir" if local_dir is not None else "HF_HUB_CACHE")
    free = hub.free_space(p.target.root)
    if need > free:
        raise hub.DiskSpaceError(
            f"not enough disk space: {_size(need)} to download, {_size(free)} free in {p.target.root}",
            "free some space, or pass --local-dir on a disk with room",
        )
    resumed = p.total_bytes - need
    console.print(f"{_size(need)} to download into {escape(str(p.target.root))} ({_size(free)} free)"
                  + (f"; resuming, {_size(resumed)} already here" if resumed else ""), soft_wrap=True)
    if not assume_yes and not _confirm(console, f"Download {_size(need)}?"):
        raise GptossError("download cancelled; nothing was fetched")
    with _RichProgress(console, p.total_bytes, p.total_bytes - need) as progress:
        hub.fetch_all(p.listing, p.files, p.target, progress, workers=workers)
    console.print(f"[green]downloaded and verified:[/] {escape(str(p.folder))}", soft_wrap=True)
    how = p.repo_id if local_dir is None else str(p.folder)
    console.print(f"chat with it: gptoss chat --model {escape(how)}", soft_wrap=True)
    return p.folder


def check_writable(folder: Path, option: str) -> None:
    """Say now, in one line, that ``folder`` cannot be made or written (not mid-download); it
    creates nothing: the nearest existing folder above it must be a writable folder."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    why = None
    if not existing.is_dir():
        why = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"{existing} is not writable"
    if why:
        raise GptossError(f"cannot write to {folder}: {why}", f"choose a {option} you can write to")


def _confirm(console, question: str) -> bool:
    if not sys.stdin.isatty():
        raise GptossError("not asking for confirmation: stdin is not a terminal", "pass --yes to download anyway")
    from rich.prompt import Confirm

    return Confirm.ask(question, console=console, default=True)


class _RichProgress:
    """Overall and per-file bars with speed and time left (``hub.Progress``)."""

    def __init__(self, console, total: int, done: int):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        self.progress = Progress(
            TextColumn("{task.description}", style="bold"), BarColumn(), TaskProgressColumn(), DownloadColumn(binary_units=False),
            TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )
        self.total = self.progress.add_task("total", total=total, completed=done)
        self.tasks: dict[str, int] = {}
        self.lock = threading.Lock()

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def start(self, f: hub.RemoteFile, have: int) -> None:
        if have >= f.size:
            return
        with self.lock:
            self.tasks[f.path] = self.progress.add_task(f.path, total=f.size, completed=have)

    def advance(self, f: hub.RemoteFile, n: int) -> None:
        self.progress.advance(self.total, n)
        task = self.tasks.get(f.path)
        if task is not None:
            self.progress.advance(task, n)

    def done(self, f: hub.RemoteFile) -> None:
        with self.lock:
            task = self.tasks.pop(f.path, None)
        if task is not None:
            self.progress.remove_task(task)


# ---- what is on disk ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LocalModel:
    name: str                     # hub id (HF cache) or folder name (gptoss data dir)
    path: Path
    size: int                     # bytes on disk
    layouts: tuple[str, ...]      # "hf", "original"
    source: str                   # "hf-cache" or "gptoss"
    revision: str | None = None   # refs pointing at the snapshot, else its commit
    random_weights: bool = False


def _read_config(folder: Path) -> ModelConfig | None:
    for path in (folder / "config.json", folder / "original" / "config.json"):
        if path.is_file():
            try:
                return ModelConfig.from_file(path)
            except CheckpointError:
                return None
    return None


def layouts_in(folder: Path) -> tuple[str, ...]:
    found = []
    root_cfg = folder / "config.json"
    if root_cfg.is_file() and any(folder.glob("*.safetensors")):
        found.append("hf")
    if (folder / "original" / "config.json").is_file() and any((folder / "original").glob("*.safetensors")):
        found.append("original")
    return tuple(found)


def on_disk(model: str, *, layout: str = "hf", local_dir: Path | None = None,
            revision: str | None = None) -> Path | None:
    """A complete copy of ``model`` in ``layout`` already on this machine, found without network."""
    from .resolve import cached_snapshot

    folder = Path(local_dir) if local_dir is not None else cached_snapshot(repo_id_for(model), revision)
    if folder is None or _read_config(folder) is None:
        return None
    want = ("hf", "original") if layout == "both" else (layout,)
    have = layouts_in(folder)
    return folder if all(w in have for w in want) else None


def list_local() -> list[LocalModel]:
    """gpt-oss checkpoints on disk: HF cache snapshots and gptoss's own models folder, with sizes."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    found: list[LocalModel] = []
    try:
        info = scan_cache_dir(hub.cache_root())
    except CacheNotFound:
        info = None
    for repo in sorted(info.repos, key=lambda r: r.repo_id) if info else ():
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified):
            cfg = _read_config(Path(rev.snapshot_path))
            if cfg is None:
                continue
            refs = ",".join(sorted(rev.refs)) or rev.commit_hash[:12]
            found.append(LocalModel(repo.repo_id, Path(rev.snapshot_path), rev.size_on_disk,
                                    layouts_in(Path(rev.snapshot_path)), "hf-cache", refs, cfg.random_weights))
    own = local_models_dir()
    for folder in sorted(own.iterdir()) if own.is_dir() else ():
        cfg = _read_config(folder) if folder.is_dir() else None
        if cfg is None:
            continue
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        found.append(LocalModel(folder.name, folder, size, layouts_in(folder), "gptoss", None, cfg.random_weights))
    return found


def print_list(models: list[LocalModel], console) -> None:
    """A table of ``list_local()``: what to pass to ``--model`` for each, and its size."""
    from rich.table import Table

    if not models:
        console.print("no gpt-oss model on disk yet: `gptoss download` fetches gpt-oss-20b, "
                      "`gptoss download tiny-random` writes a toy one offline")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("--model")
    table.add_column("revision")
    table.add_column("layouts")
    table.add_column("size", justify="right")
    table.add_column("note")
    for m in models:
        default = m.source == "gptoss" or "main" in (m.revision or "").split(",")
        table.add_row(escape(m.name if default else str(m.path)), escape(m.revision or "-"),
                      ",".join(m.layouts) or "-", _size(m.size), "random weights" if m.random_weights else "")
    console.print(table)
    console.print(f"Hugging Face cache: {escape(str(hub.cache_root()))}", soft_wrap=True)
    console.print(f"gptoss models: {escape(str(local_models_dir()))}", soft_wrap=True)


# ---- tiny-random and eval data ------------------------------------------------------------------

def write_tiny_random(local_dir: Path | None = None, console=None) -> Path:
    """Write the "tiny" preset with random weights in both hub layouts, without network.

    The files are written into a hidden sibling folder and renamed into place at the end, so a
    run that fails or is interrupted leaves no half-written model behind (and an earlier
    tiny-random stays as it was)."""
    from rich.console import Console
    from safetensors import SafetensorError

    from .synthetic import write_checkpoint

    console = console or Console(highlight=False)
    folder = Path(local_dir) if local_dir is not None else local_models_dir() / TINY_RANDOM
    existing = _read_config(folder)
    where = "--local-dir" if local_dir is not None else "GPTOSS_HOME"
    if (folder / "config.json").exists() and (existing is None or not existing.random_weights):
        raise GptossError(f"{folder} already holds another model; not overwriting it with random weights",
                          "choose another --local-dir")
    if existing is None and folder.is_dir() and any(folder.iterdir()):
        raise GptossError(f"{folder} is not empty; not writing a model among other files",
                          f"choose an empty or new {where}")
    check_writable(folder, where)
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # a run of the same pid that was killed
        write_checkpoint(partial, PRESETS["tiny"], layout="both", shards=2, seed=0, tokenizer=True)
        _swap_in(partial, folder)
    except (OSError, SafetensorError) as e:  # the latter: a failed write inside save_file (disk full)
        why = why_not_written(folder, e) if isinstance(e, OSError) else str(e)
        raise GptossError(f"cannot write tiny-random to {folder}: {why}",
                          f"choose a {where} you can write to, with room for about 110 MB") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    console.print(f"[bold yellow]wrote tiny-random to {escape(str(folder))}: real file formats, RANDOM weights. "
                  "Everything a model loaded from it says is noise.[/]", soft_wrap=True)
    how = TINY_RANDOM if local_dir is None else str(folder)
    console.print(f"try it: gptoss chat --model {escape(how)}", soft_wrap=True)
    return folder


def _swap_in(new: Path, folder: Path) -> None:
    """Rename the finished folder ``new`` to ``folder``; an earlier one there (an empty folder, or
    a random checkpoint being rewritten) is moved aside first and removed only after."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        os.replace(new, folder)            # rename(2) replaces an empty folder
        return
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    try:
        os.replace(new, folder)
    except OSError:
        os.replace(old, folder)            # put the earlier one back
        raise
    shutil.rmtree(old, ignore_errors=True)


def fetch_eval(name: str, *, revision: str | None = None, console=None) -> Path:
    """Fetch eval data set ``name`` (see ``EVAL_DATASETS``) into its folder; returns the folder."""
    from rich.console import Console

    console = console or Console(highlight=False)
    ds = EVAL_DATASETS.get(name)
    if ds is None:
        raise GptossError(f"unknown eval data set {name!r}", f"choose one of {', '.join(EVAL_DATASETS)}")
    try:
        listing = hub.list_repo(ds.repo, revision, repo_type="dataset")
    except hub.HubUnreachable as e:
        if revision is None and all((ds.folder / f).is_file() for f in ds.files):
            console.print(f"[yellow]{escape(e.reason)}[/]: using the copy already on disk, "
                          f"{escape(str(ds.folder))}", soft_wrap=True)
            return ds.folder
        raise
    missing = [f for f in ds.files if f not in listing.files]
    if missing:
        raise GptossError(f"dataset {ds.repo} has no {', '.join(missing)}", "the data set changed on the hub; "
                          "pass --revision of a version that has it")
    files = [listing.files[f] for f in ds.files]
    target = hub.FolderTarget(listing, ds.folder)
    need = sum(f.size - target.have(f) for f in files)
    free = hub.free_space(ds.folder)
    if need > free:
        raise hub.DiskSpaceError(f"not enough disk space: {_size(need)} to download, {_size(free)} free",
                                 "free some space")
    console.print(f"[bold]{ds.repo}[/] ({listing.commit[:10]}): {', '.join(ds.files)}, {_size(need)} to download")
    total = sum(f.size for f in files)
    with _RichProgress(console, total, total - need) as progress:
        hub.fetch_all(listing, files, target, progress, workers=2)
    console.print(f"[green]{name} data:[/] {escape(str(ds.folder))}", soft_wrap=True)
    return ds.folder


# ---- the command --------------------------------------------------------------------------------

def run(*, model: str, layout: str, local_dir: Path | None, revision: str | None, list_: bool,
        eval_name: str | None, yes: bool) -> None:
    """``gptoss download``: dispatch on what was asked."""
    from rich.console import Console

    console = Console(highlight=False)
    if list_:
        print_list(list_local(), console)
    elif eval_name:
        fetch_eval(eval_name, revision=revision, console=console)
    elif model == TINY_RANDOM:
        write_tiny_random(local_dir, console)
    else:
        pull(model, layout=layout, local_dir=local_dir, revision=revision, assume_yes=yes, console=console)

"""The ``o200k_harmony`` tiktoken encoding, built offline.

gpt-oss speaks ``o200k_harmony``: o200k_base's byte-level BPE ranks and split regex, plus the
Harmony special tokens (DESIGN.md section 4). ``tiktoken.get_encoding`` downloads the ranks at
first use, so this module never calls it: the ranks come from, in order,

1. the model folder's ``tokenizer.json`` (Hugging Face byte-level BPE: rank = id of each
   non-special token, after undoing the byte-to-unicode alphabet);
2. an ``o200k_base.tiktoken`` in the model folder (or in its parent, for an ``original/`` folder);
3. ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`` (the folder openai-harmony also reads);
4. the ``o200k_base.tiktoken.gz`` that the ``bpe-openai`` package ships.

``write_tokenizer_json`` goes the other way and writes a real ``tokenizer.json`` (vocab and merges
computed from the ranks) for checkpoints we create ourselves. This module knows nothing about
Harmony messages; ``harmony.py`` builds on it.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import importlib.util
import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import tiktoken

from .errors import GptossError

ENCODING_NAME = "o200k_harmony"
N_VOCAB = 201088  # ids 0 .. 201087; the model's embedding has one row per id

# o200k_base's pre-tokenizer regex, as tiktoken_ext.openai_public defines it.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

_NAMED_SPECIALS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,
}
FIRST_SPECIAL_ID = min(_NAMED_SPECIALS.values())  # every rank of the BPE lies below it


def _special_tokens() -> dict[str, int]:
    named_ids = set(_NAMED_SPECIALS.values())
    reserved = {
        f"<|reserved_{i}|>": i for i in range(FIRST_SPECIAL_ID, N_VOCAB) if i not in named_ids
    }
    return dict(sorted({**_NAMED_SPECIALS, **reserved}.items(), key=lambda kv: kv[1]))


# Every special token of o200k_harmony, name -> id, in id order (one name per id).
SPECIAL_TOKENS: dict[str, int] = _special_tokens()
# Second names the encoding also accepts. tiktoken's o200k_harmony takes o200k_base's specials
# (<|endofprompt|> is 200018) and then names every id from 200013 on <|reserved_N|>, so 200018 has
# both names, and openai-harmony knows it only as <|reserved_200018|>: text with either name
# encodes to 200018. Decoding gives <|endofprompt|>, as tiktoken's o200k_harmony does.
SPECIAL_ALIASES: dict[str, int] = {"<|reserved_200018|>": 200018}

TOKENIZER_JSON = "tokenizer.json"
TIKTOKEN_FILE = "o200k_base.tiktoken"


# ---- the byte-level alphabet of Hugging Face / GPT-2 tokenizers ---------------------------------


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards, in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def _token_to_str(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


# ---- reading ranks ---------------------------------------------------------------------------


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Ranks from a ``.tiktoken`` file (``base64-token rank`` per line), plain or gzipped."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        ranks = {}
        for line in raw.splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise GptossError(f"cannot read {path}: {e}") from None
    except (ValueError, binascii.Error):
        raise GptossError(f"{path} is not a tiktoken ranks file (base64 token, rank per line)") from None
    return ranks


def read_tokenizer_json_ranks(path: Path) -> dict[bytes, int]:
    """Ranks from a Hugging Face byte-level BPE ``tokenizer.json``.

    The rank of a token is its id; tokens listed in ``added_tokens`` are the special tokens and
    are left out (their ids come from ``SPECIAL_TOKENS``).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        vocab = model["vocab"]
        added = {int(t["id"]) for t in data.get("added_tokens") or ()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptossError(f"cannot read {path}: {e}") from None
    except (KeyError, TypeError, ValueError):
        raise GptossError(f"{path} is not a Hugging Face tokenizer.json (no model.vocab)") from None
    if model.get("type", "BPE") != "BPE" or not isinstance(vocab, dict):
        raise GptossError(f"{path} is not a BPE tokenizer; gpt-oss needs o200k_harmony")
    decode = _unicode_to_byte()
    try:
        return {
            bytes(decode[c] for c in text): int(i)
            for text, i in vocab.items()
            if int(i) not in added and text not in SPECIAL_TOKENS
        }
    except (KeyError, TypeError, ValueError):
        raise GptossError(
            f"{path} is not a byte-level BPE vocabulary", "gpt-oss needs the o200k_harmony tokenizer"
        ) from None


def read_ranks(path: Path) -> dict[bytes, int]:
    """Ranks from either file kind; which one is decided by the content, not the name."""
    try:
        with path.open("rb") as f:
            head = f.read(64).lstrip()
    except OSError as e:
        raise GptossError(f"cannot read {path}: {e}") from None
    return read_tokenizer_json_ranks(path) if head.startswith(b"{") else read_tiktoken_ranks(path)


# ---- finding the source ----------------------------------------------------------------------


def _packaged_tiktoken() -> Path | None:
    """bpe-openai's packaged o200k_base ranks, if that package is installed (not imported: only
    its data file is needed)."""
    spec = importlib.util.find_spec("bpe_openai")
    for location in (spec.submodule_search_locations or ()) if spec else ():
        path = Path(location) / "data" / "o200k_base.tiktoken.gz"
        if path.is_file():
            return path
    return None


def find_ranks_source(folder: str | Path | None = None) -> Path:
    """The file ``load_encoding(folder)`` reads its ranks from, following the module's order."""
    dirs: list[Path] = []
    if folder is not None:
        folder = Path(folder)
        dirs = [folder] + ([folder.parent] if folder.name == "original" else [])
    env_base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    candidates = [d / TOKENIZER_JSON for d in dirs] + [d / TIKTOKEN_FILE for d in dirs]
    if env_base:
        candidates.append(Path(env_base) / TIKTOKEN_FILE)
    for path in candidates:
        if path.is_file():
            return path
    packaged = _packaged_tiktoken()
    if packaged is not None:
        return packaged
    where = f"{folder} has no {TOKENIZER_JSON} or {TIKTOKEN_FILE}" if folder else "no model folder"
    raise GptossError(
        f"no tokenizer found: {where}, TIKTOKEN_ENCODINGS_BASE names no folder holding "
        f"{TIKTOKEN_FILE}, and the bpe-openai package is not installed",
        "download the model with `gptoss download` or `pip install bpe-openai`",
    )


# ---- building the encoding -------------------------------------------------------------------


def encoding_from_ranks(ranks: Mapping[bytes, int], name: str = ENCODING_NAME) -> tiktoken.Encoding:
    """A tiktoken encoding of ``ranks`` with o200k's regex and the Harmony special tokens."""
    problems = []
    if any(bytes([b]) not in ranks for b in range(256)):
        problems.append("not every single byte has a token")
    if len(set(ranks.values())) != len(ranks):
        problems.append("two tokens share a rank")
    if ranks and max(ranks.values()) >= FIRST_SPECIAL_ID:
        problems.append(f"ranks reach id {max(ranks.values())}, where special tokens begin")
    if problems:
        raise GptossError("the tokenizer's ranks are not o200k-like: " + "; ".join(problems))
    return tiktoken.Encoding(
        name, pat_str=O200K_PATTERN, mergeable_ranks=dict(ranks),
        special_tokens={**SPECIAL_TOKENS, **SPECIAL_ALIASES},
    )


@lru_cache(maxsize=8)
def _cached_encoding(path: str, mtime_ns: int, size: int) -> tiktoken.Encoding:
    # mtime and size are part of the key so that a rewritten file is read again
    return encoding_from_ranks(read_ranks(Path(path)))


def load_encoding(folder: str | Path | None = None) -> tiktoken.Encoding:
    """The ``o200k_harmony`` encoding, built from the first source found (see the module doc).

    Built once per source file and cached: 200k ranks take about a second to read and build.
    Raises ``GptossError`` naming what is missing when no source exists.
    """
    path = find_ranks_source(folder).resolve()
    stat = path.stat()
    return _cached_encoding(str(path), stat.st_mtime_ns, stat.st_size)


# ---- writing a tokenizer.json ----------------------------------------------------------------


def _last_merge(token: bytes, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes] | None:
    """The pair tiktoken's BPE joins last when it builds ``token`` (merges below its rank only).

    Byte-pair encoding of the token's own bytes, stopping before the token's rank, leaves exactly
    the two parts whose merge creates it; that pair is the token's Hugging Face merge rule.
    """
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            return None
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Hugging Face merge rules equivalent to tiktoken's rank order, one per multi-byte token."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            pair = _last_merge(token, ranks)
            if pair is not None:
                merges.append(pair)
    return merges


def _source_file(source: str | Path | None) -> Path:
    if source is None or Path(source).is_dir():
        return find_ranks_source(source).resolve()
    if not Path(source).is_file():
        raise GptossError(f"{source} does not exist")
    return Path(source).resolve()


@lru_cache(maxsize=2)
def _cached_tokenizer_json(path: str, mtime_ns: int, size: int) -> str:
    # deriving the merges takes seconds; test fixtures and `download tiny-random` repeat it
    return json.dumps(tokenizer_json_dict(read_ranks(Path(path))), ensure_ascii=False)


def tokenizer_json_dict(ranks: Mapping[bytes, int]) -> dict:
    """The ``tokenizer.json`` document of o200k_harmony for ``ranks`` (see write_tokenizer_json)."""
    to_str = _token_to_str
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for text, i in SPECIAL_TOKENS.items()
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            # a piece that is itself a token is taken whole, as tiktoken does
            "ignore_merges": True,
            "vocab": {to_str(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])},
            # "a b" strings (byte-level text never holds a space): every tokenizers version reads them
            "merges": [f"{to_str(a)} {to_str(b)}" for a, b in merges_from_ranks(ranks)],
        },
    }


def write_tokenizer_json(
    path: Path, ranks_source: str | Path | Mapping[bytes, int] | None = None
) -> None:
    """Write a Hugging Face ``tokenizer.json`` that encodes exactly as ``o200k_harmony``.

    ``ranks_source``: a ranks mapping, a ``.tiktoken``(.gz) or ``tokenizer.json`` file, a model
    folder, or None for the offline default sources of ``load_encoding``. The file holds the
    byte-level vocabulary, merges derived from the ranks, o200k's split regex and the special
    tokens as added tokens, so ``tokenizers``/``transformers`` and ``load_encoding`` read it alike.
    """
    if isinstance(ranks_source, Mapping):
        text = json.dumps(tokenizer_json_dict(ranks_source), ensure_ascii=False)
    else:
        source = _source_file(ranks_source)
        stat = source.stat()
        text = _cached_tokenizer_json(str(source), stat.st_mtime_ns, stat.st_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

"""Shared pytest fixtures."""

from __future__ import annotations

import gzip
import hashlib
from importlib.resources import files

import pytest

# ==== tokenizer and Harmony fixtures (tests/test_tokenizer.py, tests/test_harmony.py) ===========
# The real o200k_base ranks come from the bpe-openai package, unpacked once per session; the
# oracle is OpenAI's openai-harmony, which reads them offline from $TIKTOKEN_ENCODINGS_BASE.

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


@pytest.fixture(scope="session")
def o200k_dir(tmp_path_factory):
    """A folder holding the real ``o200k_base.tiktoken``; TIKTOKEN_ENCODINGS_BASE names it."""
    packed = files("bpe_openai") / "data" / "o200k_base.tiktoken.gz"
    data = gzip.decompress(packed.read_bytes())
    assert hashlib.sha256(data).hexdigest() == O200K_SHA256, "bpe-openai ships other ranks"
    folder = tmp_path_factory.mktemp("o200k")
    (folder / "o200k_base.tiktoken").write_bytes(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_ENCODINGS_BASE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def o200k_encoding(o200k_dir):
    """Our ``o200k_harmony`` encoding, built from the unpacked ranks file."""
    from gptoss_cli.tokenizer import load_encoding

    return load_encoding(o200k_dir)


@pytest.fixture(scope="session")
def harmony_oracle(o200k_dir):
    """openai-harmony's gpt-oss encoding: the reference renderer, parser and o200k tokenizer."""
    oh = pytest.importorskip("openai_harmony")
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


# ==== end of tokenizer and Harmony fixtures ======================================================

"""Shared fixtures: tiny random gpt-oss checkpoints in the real hub layouts.

The checkpoints use the real vocabulary (201088), 4 layers, a hidden size of 64 and a window of
16 so that short prompts cross it; experts are random MXFP4 codes and scales (``synthetic.py``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from importlib.resources import files

import torch

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, so set it before any kernel module
# is imported: without a GPU the kernel tests run under Triton's interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing in the tests reaches the hub
# engines under test run the ops they are told to run: a load check that switched a failing op to
# its reference would hide the failure (tests/test_selfcheck.py turns the check on)
os.environ.setdefault("GPTOSS_CHECK", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses too: tiny shapes gain nothing from threads
torch.set_num_threads(1)

from gptoss_cli.config import PRESETS  # noqa: E402
from gptoss_cli.synthetic import write_checkpoint  # noqa: E402

TINY = PRESETS["tiny"]

try:                    # triton is Linux-only (pyproject): elsewhere the kernel tests do not apply
    import triton  # noqa: F401
except ImportError:
    collect_ignore_glob = ["test_kernels_*.py"]


@pytest.fixture(scope="session")
def tiny_full(tmp_path_factory):
    """A full hub download: HF layout in two shards with an index, and ``original/``."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-full"), TINY, layout="both", shards=2, seed=1)


@pytest.fixture(scope="session")
def tiny_hf_single(tmp_path_factory):
    """HF layout in one ``model.safetensors``, no index (same weights as ``tiny_full``)."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-hf1"), TINY, layout="hf", shards=1, seed=1)


def _load_hf_gptoss(folder, dtype: torch.dtype):
    """transformers' GptOssForCausalLM on a tiny checkpoint, its MXFP4 experts dequantised on load.

    transformers 5 would fetch MXFP4 kernels from the hub (``kernels-community/...``) for an MXFP4
    checkpoint; asking for dequantisation keeps it offline and on the CPU, as in 4.55+. The dtype
    keyword was ``torch_dtype`` before 4.56.
    """
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    quant = transformers.Mxfp4Config(dequantize=True)
    model = transformers.GptOssForCausalLM.from_pretrained(str(folder), quantization_config=quant,
                                                            **{dtype_kw: dtype})
    return model.eval()


@pytest.fixture(scope="session")
def hf_oracle(tiny_full):
    """transformers' GptOssForCausalLM on the tiny checkpoint, float32 (the test oracle)."""
    return _load_hf_gptoss(tiny_full, torch.float32)


@pytest.fixture(scope="session")
def hf_oracle_bf16(tiny_full):
    """The same in bfloat16: how far transformers' own bf16 strays from its fp32."""
    return _load_hf_gptoss(tiny_full, torch.bfloat16)


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


# ==== gptoss serve (tests/test_serve*.py) ========================================================
SERVED_MODEL = "tiny"
SERVED_CONTEXT = 1024


def start_server(engine, **kw):
    """A ``gptoss serve`` server on a free loopback port, uvicorn in a thread, as ``run`` makes it:
    (Server, its uvicorn server, base URL ``http://127.0.0.1:PORT/v1``)."""
    import threading
    import time

    from gptoss_cli.serve import Server, bind, uvicorn_server

    server = Server(engine, SERVED_MODEL, **kw)
    sock = bind("127.0.0.1", 0)
    uv = uvicorn_server(server, timeout_graceful_shutdown=1)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    uv.thread = thread
    return server, uv, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def launch_serve(folder, *args: str):
    """``gptoss serve`` as a user runs it, on a free port: (process, its startup line, base URL)."""
    import re
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "gptoss_cli", "serve", "--model", str(folder), "--port", "0",
                             "--device", "cpu", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    while not any("gptoss serve:" in x for x in lines):
        line = proc.stderr.readline()
        if not line:
            proc.kill()
            raise AssertionError("gptoss serve did not start:\n" + "".join(lines))
        lines.append(line)
    return proc, lines[-1], re.search(r"(http://\S+/v1)", lines[-1]).group(1)


def stop_server(server, uv) -> None:
    uv.should_exit = True
    uv.thread.join(10)
    server.worker.stop()


@pytest.fixture(scope="module")
def served(tiny_hf_single):
    """(Server, base URL) of a server on a free loopback port, for the whole module; its uvicorn
    server is ``Server.uvicorn``."""
    pytest.importorskip("uvicorn")
    from gptoss_cli.engine import Engine

    engine = Engine.load(tiny_hf_single, device="cpu", dtype="float32", max_context=SERVED_CONTEXT)
    server, uv, url = start_server(engine, max_queue=8)
    server.uvicorn = uv
    yield server, url
    stop_server(server, uv)


@pytest.fixture(scope="module")
def client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=served[1], api_key="unused", max_retries=0, timeout=60)

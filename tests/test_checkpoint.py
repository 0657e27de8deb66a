"""Checkpoint reading: both hub config flavours, and one clear error for each kind of damage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file, save_file

from gptoss_cli.checkpoint import Checkpoint
from gptoss_cli.config import PRESETS, ModelConfig
from gptoss_cli.engine import Engine
from gptoss_cli.errors import GptossError


def test_both_config_flavours_read_the_same(tiny_full):
    hf = ModelConfig.from_file(tiny_full / "config.json")
    orig = ModelConfig.from_file(tiny_full / "original" / "config.json")
    assert hf.replace(max_context=0) == orig.replace(max_context=0)
    assert hf.windowed_layers == (True, False, True, False)


def test_presets_have_the_published_shapes():
    p20, p120 = PRESETS["gpt-oss-20b"], PRESETS["gpt-oss-120b"]
    assert (p20.n_layers, p20.n_experts, p120.n_layers, p120.n_experts) == (24, 32, 36, 128)
    assert p20.q_dim == 4096 and p20.kv_dim == 512 and p20.vocab_size == 201088
    total20 = sum(v for k, v in p20.param_counts().items() if k != "active_experts")
    assert 20e9 < total20 < 22.5e9                    # "21B parameters"
    assert round(p20.yarn_concentration, 4) == round(0.1 * 3.4657359 + 1, 4)


def test_layout_is_read_from_the_config_keys(tiny_full, tiny_hf_single):
    assert Checkpoint.open(tiny_full).layout == "hf"
    assert Checkpoint.open(tiny_full / "original").layout == "original"
    assert Checkpoint.open(tiny_hf_single).layout == "hf"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _expect(folder, *words):
    with pytest.raises(GptossError) as e:
        Engine.load(folder, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_missing_folder(tmp_path):
    _expect(tmp_path / "nope", "does not exist")


def test_empty_folder(tmp_path):
    _expect(tmp_path, "no gpt-oss checkpoint")


def test_missing_tensor(tiny_hf_single, tmp_path):
    d = _copy(tiny_hf_single, tmp_path / "m")
    t = load_file(d / "model.safetensors")
    del t["model.layers.2.self_attn.sinks"]
    save_file(t, d / "model.safetensors")
    _expect(d, "model.layers.2.self_attn.sinks", "lacks")


def test_misnamed_tensor(tiny_full, tmp_path):
    d = _copy(tiny_full / "original", tmp_path / "o")
    t = load_file(d / "model.safetensors")
    t["block.1.mlp.gate_weight"] = t.pop("block.1.mlp.gate.weight")
    save_file(t, d / "model.safetensors")
    _expect(d, "block.1.mlp.gate.weight")


def test_wrong_shape(tiny_hf_single, tmp_path):
    d = _copy(tiny_hf_single, tmp_path / "s")
    t = load_file(d / "model.safetensors")
    t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"][:, :32].contiguous()
    save_file(t, d / "model.safetensors")
    _expect(d, "o_proj.weight", "shape", "[64, 32]")


def test_truncated_safetensors(tiny_full, tmp_path):
    d = _copy(tiny_full, tmp_path / "t")
    shard = d / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _expect(d, "model-00002-of-00002.safetensors", "truncated or corrupt")


def test_shard_listed_in_index_but_missing(tiny_full, tmp_path):
    d = _copy(tiny_full, tmp_path / "i")
    (d / "model-00001-of-00002.safetensors").unlink()
    _expect(d, "model-00001-of-00002.safetensors", "missing")


def test_unknown_model_type(tiny_hf_single, tmp_path):
    d = _copy(tiny_hf_single, tmp_path / "u")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    _expect(d, "llama", "gpt_oss")


def test_unsupported_quantization(tiny_hf_single, tmp_path):
    d = _copy(tiny_hf_single, tmp_path / "q")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    _expect(d, "gptq")


def test_config_that_is_not_json(tiny_hf_single, tmp_path):
    d = _copy(tiny_hf_single, tmp_path / "j")
    (d / "config.json").write_text("{not json")
    _expect(d, "config.json", "JSON")


def test_config_without_weights(tiny_hf_single, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    shutil.copy(tiny_hf_single / "config.json", d / "config.json")
    _expect(d, "no .safetensors")


LOAD_PEAK = textwrap.dedent("""
    import resource, sys, torch
    from gptoss_cli.engine import Engine
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    eng = Engine.load(sys.argv[1], device="cpu", dtype="bfloat16", max_context=64)
    m = eng.model
    for t in [m.embedding, m.unembedding] + [t for b in m.blocks for t in vars(b).values() if torch.is_tensor(t)]:
        int(t.contiguous().view(-1).view(torch.uint8).max())  # touch every page, copying nothing
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(base, peak, eng.model.nbytes())
""")


def test_load_peak_memory_is_about_the_file_size(tmp_path):
    """Experts dominate this checkpoint; if they were dequantized at load, the peak would be
    about 4x their packed size. The peak must stay near the size of the files."""
    from gptoss_cli.synthetic import write_checkpoint

    cfg = PRESETS["tiny"].replace(d_model=256, d_ff=2048, n_experts=96, n_heads=8, d_head=32,
                                  vocab_size=8192, n_layers=2)
    d = write_checkpoint(tmp_path / "big", cfg, layout="hf", tokenizer=False)
    size = (d / "model.safetensors").stat().st_size
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(d)], capture_output=True, text=True, check=True)
    base, peak, model_bytes = map(int, out.stdout.split())
    assert model_bytes == pytest.approx(size, rel=0.05)
    assert peak - base < 1.6 * size, (peak - base) / size


def test_one_layout_snapshot_the_hub_client_calls_incomplete_is_found(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import IncompleteSnapshotError

    from gptoss_cli import resolve

    def incomplete(*args, **kwargs):
        raise IncompleteSnapshotError("original/ missing", snapshot_path=str(tmp_path))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", incomplete)
    assert resolve.cached_snapshot("openai/gpt-oss-20b") == tmp_path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_POPULATE_READ) is Linux's")
def test_prefault_maps_the_weights_in_before_the_first_forward(tmp_path):
    """CPU weights stay views of the file's memory map; ``prefault`` maps their pages in at load,
    so that reading them afterwards takes (almost) no page faults."""
    import resource

    import torch
    from safetensors import safe_open

    from gptoss_cli.checkpoint import prefault

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64 << 20, dtype=torch.uint8), "b": torch.ones(64 << 20, dtype=torch.uint8)}, path)

    def faults_reading(do_prefault: bool) -> int:
        with safe_open(path, framework="pt") as f:
            t = f.get_tensor("a" if do_prefault else "b")
            if do_prefault:
                prefault([t])
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            assert int(t.max()) == 1
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    cold = faults_reading(False)     # a fault maps up to a large folio of the page cache: few
    if cold < 8:
        pytest.skip(f"reading 64 MB of a mapped file took {cold} page faults here: nothing to remove")
    assert faults_reading(True) <= cold // 8

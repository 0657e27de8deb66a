"""Random gpt-oss weights in the real formats: for tests, benchmarks and offline trials.

``random_tensors`` draws every canonical tensor for a config directly on a device, experts as
random MXFP4 codes and E8M0 scales (never a dense copy), at scales that keep activations of
order one through the layers, with a router whose logits spread tokens over many experts.
``write_checkpoint`` writes them as a hub checkpoint, in the HF layout (one file or shards with
an index), OpenAI's ``original/`` layout, or both, as the hub's gpt-oss repos hold them.

Its output is noise: every command that loads it says so (``README.txt`` and the config's
``gptoss_random_weights`` flag).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .checkpoint import DENSE, FP32, PACKED, canonical_shapes, name_table
from .config import ModelConfig

RANDOM_MARKER = "gptoss_random_weights"


def _mxfp4_exponent(fan_in: int, target_std: float) -> int:
    """E8M0 exponent making ``fan_in`` random FP4 values (E[v^2] = 8.5625) sum to ``target_std``."""
    return round(math.log2(target_std / math.sqrt(8.5625 * fan_in)))


def random_tensors(
    cfg: ModelConfig, device="cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Every canonical tensor of ``cfg``: dense ones in ``dtype`` (values exact in bf16), norm
    scales and sinks in float32, experts as uint8 MXFP4.

    The numbers are drawn on ``device`` by its own generator: on a GPU the 20b draws take
    seconds instead of the ~100 s of drawing on the CPU and copying (120b: ~520 s). The same
    seed gives different numbers on CPU and GPU; each is reproducible."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=g, device=device)
    out: dict[str, torch.Tensor] = {}
    exponents = {  # per kind of packed weight: fan-in and the output scale we aim for
        "w1": _mxfp4_exponent(cfg.d_model, 2.0),
        "w2": _mxfp4_exponent(cfg.d_ff, 0.05),
    }
    for name, (shape, kind) in canonical_shapes(cfg).items():
        leaf = name.split(".")[-2] if kind == PACKED else name
        if kind == PACKED:
            if name.endswith("blocks"):
                t = torch.randint(0, 256, shape, dtype=torch.int32, **kw).to(torch.uint8)
            else:
                e = exponents[leaf]
                t = (127 + e + torch.randint(-1, 2, shape, dtype=torch.int32, **kw)).to(torch.uint8)
        elif kind == FP32:
            if name.endswith("sinks"):
                t = torch.randn(shape, **kw)
            else:
                t = 1.0 + 0.1 * torch.randn(shape, **kw)
            t = t.to(torch.bfloat16).float()
        else:
            t = torch.randn(shape, **kw) * _dense_std(name, shape, cfg)
            t = t.to(torch.bfloat16).to(dtype)
        out[name] = t
    return out


def _dense_std(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> float:
    if name == "embedding.weight":
        return 1.0
    if name.endswith("bias"):
        return 0.1 if "router" in name else 0.02
    if name.endswith("out.weight"):
        return 0.5 / math.sqrt(shape[1])
    return 1.0 / math.sqrt(shape[-1])  # qkv, router, unembedding: unit-variance outputs


def hub_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Canonical tensors -> the hub names of ``layout`` (splitting a fused qkv for HF), as the
    hub stores them: bf16 for floating tensors, uint8 for MXFP4."""
    shapes = canonical_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for canon, sources in name_table(layout, cfg).items():
        t = tensors[canon]
        if shapes[canon][1] in (DENSE, FP32):
            t = t.to(torch.bfloat16)
        if len(sources) == 1:
            out[sources[0]] = t.contiguous().cpu()
        else:  # q, k, v stacked on the output dimension
            for src, part in zip(sources, t.split((cfg.q_dim, cfg.kv_dim, cfg.kv_dim), dim=0)):
                out[src] = part.contiguous().cpu()
    return out


def write_checkpoint(
    folder: str | Path, cfg: ModelConfig, layout: str = "both", shards: int = 1, seed: int = 0,
    tokenizer: bool = True,
) -> Path:
    """Write a random checkpoint of ``cfg`` into ``folder`` in the hub's layout(s).

    layout: "hf" (repo root), "original" (``original/``) or "both" (a full hub download).
    shards: number of HF safetensors files (> 1 writes ``model-0000N-of-0000M`` and an index).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(cfg, seed=seed)
    meta = {"format": "pt"}
    if layout in ("hf", "both"):
        hf = hub_tensors(cfg, tensors, "hf")
        config = cfg.to_hf_config() | {RANDOM_MARKER: True}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if shards <= 1:
            save_file(hf, folder / "model.safetensors", metadata=meta)
        else:
            names = list(hf)
            per = math.ceil(len(names) / shards)
            weight_map = {}
            for s in range(shards):
                fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
                part = {n: hf[n] for n in names[s * per:(s + 1) * per]}
                save_file(part, folder / fname, metadata=meta)
                weight_map.update({n: fname for n in part})
            total = sum(t.numel() * t.element_size() for t in hf.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if layout in ("original", "both"):
        orig = folder / "original"
        orig.mkdir(exist_ok=True)
        config = cfg.to_original_config() | {RANDOM_MARKER: True}
        (orig / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(hub_tensors(cfg, tensors, "original"), orig / "model.safetensors", metadata=meta)
    if tokenizer:
        from .tokenizer import write_tokenizer_json

        write_tokenizer_json(folder / "tokenizer.json")
    (folder / "README.txt").write_text(
        "Random gpt-oss weights written by `gptoss`: the architecture and file formats are real,\n"
        "the numbers are noise. Anything a model loaded from here says is meaningless.\n"
    )
    return folder

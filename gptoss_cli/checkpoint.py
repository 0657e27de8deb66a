"""Reading gpt-oss checkpoints of both hub layouts into one set of canonical tensor names.

Layouts (DESIGN.md 3):
- HF, at the repo root: ``config.json`` with ``model_type: gpt_oss`` and ``model.safetensors`` or
  ``model-0000N-of-0000M.safetensors`` shards (with or without ``model.safetensors.index.json``).
- OpenAI's ``original/``: ``config.json`` with ``num_experts`` and one ``model.safetensors``.

The layout is decided from the config's keys. Each layout has one name table mapping canonical
names to the hub names they are read from (several names are concatenated on dim 0: HF's q/k/v
become one ``qkv``). Every tensor has a kind that says how it is stored in memory:

- ``dense``: cast to the activation dtype (attention, router, embeddings, expert biases);
- ``fp32``: kept in float32 (norm scales, sinks: they are applied in fp32);
- ``packed``: MXFP4 blocks and scales stay uint8; never dequantized here.

On CPU, tensors already in their target dtype are not copied: they stay views of the files'
memory maps, and ``prefault`` maps their pages in while loading (otherwise the first prompt
would take the page faults: 3x its prefill time at 20b).

Tensors are read one at a time straight to the target device, so peak memory while loading is
about the size of the files.
"""

from __future__ import annotations

import ctypes
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CheckpointError

DENSE, FP32, PACKED = "dense", "fp32", "packed"


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every canonical tensor with its shape and kind."""
    D, F, E, V = cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.vocab_size
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "embedding.weight": ((V, D), DENSE),
        "norm.scale": ((D,), FP32),
        "unembedding.weight": ((V, D), DENSE),
    }
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        shapes.update({
            p + "attn.norm.scale": ((D,), FP32),
            p + "attn.qkv.weight": ((cfg.qkv_dim, D), DENSE),
            p + "attn.qkv.bias": ((cfg.qkv_dim,), DENSE),
            p + "attn.sinks": ((cfg.n_heads,), FP32),
            p + "attn.out.weight": ((D, cfg.q_dim), DENSE),
            p + "attn.out.bias": ((D,), DENSE),
            p + "mlp.norm.scale": ((D,), FP32),
            p + "mlp.router.weight": ((E, D), DENSE),
            p + "mlp.router.bias": ((E,), DENSE),
            p + "mlp.w1.blocks": ((E, 2 * F, D // 32, 16), PACKED),
            p + "mlp.w1.scales": ((E, 2 * F, D // 32), PACKED),
            p + "mlp.w1.bias": ((E, 2 * F), DENSE),
            p + "mlp.w2.blocks": ((E, D, F // 32, 16), PACKED),
            p + "mlp.w2.scales": ((E, D, F // 32), PACKED),
            p + "mlp.w2.bias": ((E, D), DENSE),
        })
    return shapes


# Per-layer name tables: canonical suffix -> hub names (concatenated on dim 0 when several).
_HF_LAYER = {
    "attn.norm.scale": ("input_layernorm.weight",),
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.sinks": ("self_attn.sinks",),
    "attn.out.weight": ("self_attn.o_proj.weight",),
    "attn.out.bias": ("self_attn.o_proj.bias",),
    "mlp.norm.scale": ("post_attention_layernorm.weight",),
    "mlp.router.weight": ("mlp.router.weight",),
    "mlp.router.bias": ("mlp.router.bias",),
    "mlp.w1.blocks": ("mlp.experts.gate_up_proj_blocks",),
    "mlp.w1.scales": ("mlp.experts.gate_up_proj_scales",),
    "mlp.w1.bias": ("mlp.experts.gate_up_proj_bias",),
    "mlp.w2.blocks": ("mlp.experts.down_proj_blocks",),
    "mlp.w2.scales": ("mlp.experts.down_proj_scales",),
    "mlp.w2.bias": ("mlp.experts.down_proj_bias",),
}
_HF_GLOBAL = {
    "embedding.weight": ("model.embed_tokens.weight",),
    "norm.scale": ("model.norm.weight",),
    "unembedding.weight": ("lm_head.weight",),
}
_ORIGINAL_LAYER = {
    "attn.norm.scale": ("attn.norm.scale",),
    "attn.qkv.weight": ("attn.qkv.weight",),
    "attn.qkv.bias": ("attn.qkv.bias",),
    "attn.sinks": ("attn.sinks",),
    "attn.out.weight": ("attn.out.weight",),
    "attn.out.bias": ("attn.out.bias",),
    "mlp.norm.scale": ("mlp.norm.scale",),
    "mlp.router.weight": ("mlp.gate.weight",),
    "mlp.router.bias": ("mlp.gate.bias",),
    "mlp.w1.blocks": ("mlp.mlp1_weight.blocks",),
    "mlp.w1.scales": ("mlp.mlp1_weight.scales",),
    "mlp.w1.bias": ("mlp.mlp1_bias",),
    "mlp.w2.blocks": ("mlp.mlp2_weight.blocks",),
    "mlp.w2.scales": ("mlp.mlp2_weight.scales",),
    "mlp.w2.bias": ("mlp.mlp2_bias",),
}
_ORIGINAL_GLOBAL = {
    "embedding.weight": ("embedding.weight",),
    "norm.scale": ("norm.scale",),
    "unembedding.weight": ("unembedding.weight",),
}
LAYOUTS = {
    "hf": (_HF_GLOBAL, _HF_LAYER, "model.layers.{i}."),
    "original": (_ORIGINAL_GLOBAL, _ORIGINAL_LAYER, "block.{i}."),
}


def name_table(layout: str, cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Canonical name -> the hub names it is made of, for one layout."""
    glob, layer, prefix = LAYOUTS[layout]
    table = dict(glob)
    for i in range(cfg.n_layers):
        p = prefix.format(i=i)
        table.update({f"blocks.{i}.{k}": tuple(p + n for n in v) for k, v in layer.items()})
    return table


@dataclass
class Checkpoint:
    """A located checkpoint: its folder, layout, config and the file holding each hub tensor."""

    folder: Path            # the folder holding config.json and the weights
    layout: str             # "hf" or "original"
    config: ModelConfig
    files: dict[str, Path]  # hub tensor name -> safetensors file

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        root = Path(path).expanduser()
        if not root.exists():
            raise CheckpointError(f"checkpoint folder {root} does not exist", "check --model, or run `gptoss download`")
        if not root.is_dir():
            raise CheckpointError(f"{root} is not a folder", "point --model at the folder holding config.json")
        folder, cfg = _find_config(root)
        layout = "hf" if _is_hf_config(folder / "config.json") else "original"
        return cls(folder, layout, cfg, _index_files(folder, layout))

    @property
    def files_size(self) -> int:
        return sum(f.stat().st_size for f in set(self.files.values()))

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every canonical tensor, validated, on ``device``; dense ones in ``dtype``."""
        table = name_table(self.layout, self.config)
        expected = canonical_shapes(self.config)
        missing = [n for names in table.values() for n in names if n not in self.files]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CheckpointError(
                f"checkpoint {self.folder} lacks the tensor {missing[0]!r}{more}",
                "the download is incomplete or this is not a gpt-oss checkpoint: run `gptoss download` again",
            )
        out: dict[str, torch.Tensor] = {}
        with _Readers(device) as readers:
            for name, sources in table.items():
                shape, kind = expected[name]
                parts = [readers.get(self.files[s], s) for s in sources]
                t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
                _check(t, name, sources, shape, kind)
                out[name] = t if kind == PACKED else t.to(torch.float32 if kind == FP32 else dtype)
                del parts, t
        if torch.device(device).type == "cpu":
            prefault(out.values())
        return out


MADV_POPULATE_READ = 22     # Linux 5.14+: fault a range in for reading, without touching it


def prefault(tensors) -> None:
    """Map in now the pages of CPU tensors that are views of a file mapping, so that the first
    forward pass does not take a page fault every 4 KB of weights (measured on 4 layers of
    gpt-oss-20b in bf16: the first 74-token prefill took 3.1 s instead of 0.75 s). It populates
    the page tables only (``madvise(MADV_POPULATE_READ)``): nothing is copied and the pages stay
    the page cache's. Where the call is missing (not Linux, an older kernel) nothing happens and
    the first prompt is slower, as before."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = 4096
    seen = set()
    for t in tensors:
        storage = t.untyped_storage()
        ptr, n = storage.data_ptr(), storage.nbytes()
        if n == 0 or ptr in seen:
            continue
        seen.add(ptr)
        start = ptr & ~(page - 1)
        if madvise(start, ptr + n - start, MADV_POPULATE_READ) != 0:
            return                # EINVAL on kernels without it: none of the others would work


def _is_hf_config(path: Path) -> bool:
    try:
        return "model_type" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _find_config(root: Path) -> tuple[Path, ModelConfig]:
    """The folder to read: the root if it has weights, else its ``original/`` folder."""
    candidates = [root, root / "original"]
    for folder in candidates:
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return folder, ModelConfig.from_file(folder / "config.json")
    if (root / "config.json").is_file():
        cfg = ModelConfig.from_file(root / "config.json")  # a wrong config is the clearer error
        again = "gptoss download"
        if cfg.random_weights:  # tiny-random, in gptoss's models folder or a --local-dir
            from .resolve import local_models_dir

            again += " tiny-random" + ("" if root == local_models_dir() / "tiny-random" else f" --local-dir {root}")
        raise CheckpointError(
            f"{root} has a config.json but no .safetensors weights",
            f"the download is incomplete: run `{again}` again",
        )
    raise CheckpointError(
        f"{root} holds no gpt-oss checkpoint (no config.json here or in original/)",
        "point --model at a downloaded model folder, or run `gptoss download`",
    )


def _index_files(folder: Path, layout: str) -> dict[str, Path]:
    """Map each hub tensor name to its file, from the index if there is one, else the headers."""
    index = folder / "model.safetensors.index.json"
    if layout == "hf" and index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = {name: folder / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f.name} is listed in {index.name} but missing from {folder}",
                                      "the download is incomplete: run `gptoss download` again")
        return files
    files: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name in _header(f):
            files[name] = f
    return files


def _header(path: Path) -> list[str]:
    """Tensor names in a safetensors file, validating that the file is complete."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise _corrupt(path, e) from None


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} is truncated or corrupt ({type(e).__name__}: {e})",
        "delete it and run `gptoss download` again",
    )


class _Readers:
    """Open safetensors files on demand, once each, closed on exit."""

    def __init__(self, device):
        self.device = str(torch.device(device))
        self.open: dict[Path, object] = {}
        self._ctx = []

    def __enter__(self):
        return self

    def get(self, path: Path, name: str) -> torch.Tensor:
        from safetensors import safe_open

        try:
            if path not in self.open:
                ctx = safe_open(path, framework="pt", device=self.device)
                self.open[path] = ctx.__enter__()
                self._ctx.append(ctx)
            return self.open[path].get_tensor(name)
        except Exception as e:
            raise _corrupt(path, e) from None

    def __exit__(self, *exc):
        for ctx in self._ctx:
            ctx.__exit__(None, None, None)


def _check(t: torch.Tensor, name: str, sources: tuple[str, ...], shape, kind: str) -> None:
    src = sources[0] if len(sources) == 1 else "+".join(sources)
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(
            f"tensor {src} has shape {list(t.shape)}, expected {list(shape)} for this config",
            "config.json and the weights disagree: is this the right model folder?",
        )
    if kind == PACKED and t.dtype != torch.uint8:
        raise CheckpointError(f"tensor {src} is {t.dtype}, expected uint8 MXFP4 data")
    if kind != PACKED and not t.dtype.is_floating_point:
        raise CheckpointError(f"tensor {src} is {t.dtype}, expected a floating-point tensor")

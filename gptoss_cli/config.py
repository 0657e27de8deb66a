"""Model configuration: one dataclass, named presets, and both hub ``config.json`` flavours.

The HF flavour (repo root, ``model_type: gpt_oss``) and OpenAI's flavour (``original/config.json``)
describe the same numbers under different keys; both map onto ``ModelConfig``. Unknown keys are
ignored; derived values (layer kinds, YaRN frequencies) are computed here once.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError

VOCAB_SIZE = 201088
# Sampling temperatures chat, eval and serve accept: the OpenAI API's range, so a setting that
# works in one works in the others (above 2 the model's text is noise anyway).
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int = 24                 # transformer blocks
    n_experts: int = 32                # experts per MoE layer
    n_experts_per_token: int = 4       # top-k routed experts
    vocab_size: int = VOCAB_SIZE
    d_model: int = 2880                # hidden size (residual stream)
    d_ff: int = 2880                   # expert intermediate size
    swiglu_limit: float = 7.0          # clamp of the SwiGLU gate and linear halves
    d_head: int = 64
    n_heads: int = 64                  # query heads
    n_kv_heads: int = 8                # key/value heads (GQA)
    sliding_window: int = 128          # window of the windowed (even) layers
    initial_context_length: int = 4096  # YaRN's original context
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0        # YaRN beta_slow
    rope_ntk_beta: float = 32.0        # YaRN beta_fast
    rms_norm_eps: float = 1e-5
    max_context: int = 131072          # max_position_embeddings
    # per layer: True when the layer attends within the sliding window; default: even layers
    windowed_layers: tuple[bool, ...] = field(default=())
    random_weights: bool = False       # written by gptoss as noise (synthetic.py); say so when used

    def __post_init__(self):
        if not self.windowed_layers:
            object.__setattr__(
                self, "windowed_layers", tuple(i % 2 == 0 for i in range(self.n_layers))
            )
        problems = []
        if len(self.windowed_layers) != self.n_layers:
            problems.append(f"{len(self.windowed_layers)} layer types for {self.n_layers} layers")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"{self.n_heads} query heads not a multiple of {self.n_kv_heads} kv heads")
        if self.d_model % 32 or self.d_ff % 32:
            problems.append("hidden and intermediate sizes must be multiples of 32 (MXFP4 blocks)")
        if self.d_head % 2:
            problems.append("head_dim must be even (RoPE rotates two halves)")
        if not 0 < self.n_experts_per_token <= self.n_experts:
            problems.append(f"experts_per_token {self.n_experts_per_token} of {self.n_experts} experts")
        if problems:
            raise CheckpointError("invalid model config: " + "; ".join(problems))

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.d_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.d_head

    @property
    def qkv_dim(self) -> int:
        return self.q_dim + 2 * self.kv_dim

    @property
    def yarn_concentration(self) -> float:
        """Multiplier of cos and sin (YaRN's attention factor): 0.1 ln(factor) + 1."""
        return 0.1 * math.log(self.rope_scaling_factor) + 1.0 if self.rope_scaling_factor > 1 else 1.0

    def param_counts(self) -> dict[str, int]:
        """Parameters by kind (experts counted as values, not bytes)."""
        attn = self.d_model * self.qkv_dim + self.qkv_dim + self.q_dim * self.d_model + self.d_model
        attn += self.n_heads + self.d_model  # sinks, norm
        router = self.n_experts * self.d_model + self.n_experts + self.d_model
        expert = 2 * self.d_ff * self.d_model + 2 * self.d_ff + self.d_model * self.d_ff + self.d_model
        return {
            "embedding": self.vocab_size * self.d_model,
            "unembedding": self.vocab_size * self.d_model,
            "attention": self.n_layers * attn,
            "router": self.n_layers * router,
            "experts": self.n_layers * self.n_experts * expert,
            "active_experts": self.n_layers * self.n_experts_per_token * expert,
        }

    def replace(self, **changes) -> "ModelConfig":
        if "n_layers" in changes and "windowed_layers" not in changes:
            changes["windowed_layers"] = ()  # recomputed: windows on the even layers
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["windowed_layers"] = list(self.windowed_layers)
        return d

    # ---- hub config.json flavours ----------------------------------------------------------
    def to_hf_config(self) -> dict:
        """The HF-layout ``config.json`` for this configuration (as the hub's gpt-oss repos write it)."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": 200002,
            "pad_token_id": 199999,
            "experts_per_token": self.n_experts_per_token,
            "num_experts_per_tok": self.n_experts_per_token,
            "num_local_experts": self.n_experts,
            "head_dim": self.d_head,
            "hidden_act": "silu",
            "hidden_size": self.d_model,
            "intermediate_size": self.d_ff,
            "initial_context_length": self.initial_context_length,
            "initializer_range": 0.02,
            "layer_types": [
                "sliding_attention" if w else "full_attention" for w in self.windowed_layers
            ],
            "max_position_embeddings": self.max_context,
            "num_attention_heads": self.n_heads,
            "num_hidden_layers": self.n_layers,
            "num_key_value_heads": self.n_kv_heads,
            "output_router_logits": False,
            "quantization_config": {
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
                "quant_method": "mxfp4",
            },
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.initial_context_length,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def to_original_config(self) -> dict:
        """OpenAI's ``original/config.json`` for this configuration."""
        return {
            "num_hidden_layers": self.n_layers,
            "num_experts": self.n_experts,
            "experts_per_token": self.n_experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.d_ff,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.d_head,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_ntk_alpha,
            "rope_ntk_beta": self.rope_ntk_beta,
        }

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        """Read either flavour; which one is decided by its keys, never by the file's path."""
        try:
            if "model_type" in raw:
                return cls._from_hf(raw, source)
            if "num_experts" in raw and "experts_per_token" in raw:
                return cls._from_original(raw)
        except CheckpointError:
            raise
        except KeyError as e:
            raise CheckpointError(f"{source} lacks the key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source} has a value of the wrong type: {e}") from None
        raise CheckpointError(
            f"{source} is not a gpt-oss config (no model_type, no num_experts)",
            "point --model at a gpt-oss checkpoint folder",
        )

    @classmethod
    def _from_hf(cls, raw: dict, source: str) -> "ModelConfig":
        if raw["model_type"] != "gpt_oss":
            raise CheckpointError(
                f"{source} is for model_type {raw['model_type']!r}, not 'gpt_oss'",
                "gptoss runs only gpt-oss checkpoints",
            )
        quant = raw.get("quantization_config") or {}
        method = quant.get("quant_method")
        if method not in (None, "mxfp4"):
            raise CheckpointError(
                f"{source} declares quantization {method!r}; only MXFP4 gpt-oss checkpoints are supported",
                "use the original openai/gpt-oss weights",
            )
        n_layers = int(raw["num_hidden_layers"])
        rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        layer_types = raw.get("layer_types")
        windowed = (
            tuple(t == "sliding_attention" for t in layer_types)
            if layer_types
            else tuple(i % 2 == 0 for i in range(n_layers))
        )
        return cls(
            n_layers=n_layers,
            n_experts=int(raw["num_local_experts"]),
            n_experts_per_token=int(raw.get("num_experts_per_tok", raw.get("experts_per_token", 4))),
            vocab_size=int(raw["vocab_size"]),
            d_model=int(raw["hidden_size"]),
            d_ff=int(raw["intermediate_size"]),
            swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
            d_head=int(raw.get("head_dim", raw["hidden_size"] // raw["num_attention_heads"])),
            n_heads=int(raw["num_attention_heads"]),
            n_kv_heads=int(raw["num_key_value_heads"]),
            sliding_window=int(raw.get("sliding_window") or 128),
            initial_context_length=int(
                rope.get("original_max_position_embeddings", raw.get("initial_context_length", 4096))
            ),
            rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 150000.0))),
            rope_scaling_factor=float(rope.get("factor", 1.0)),
            rope_ntk_alpha=float(rope.get("beta_slow", 1.0)),
            rope_ntk_beta=float(rope.get("beta_fast", 32.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            max_context=int(raw.get("max_position_embeddings", 131072)),
            windowed_layers=windowed,
            random_weights=bool(raw.get("gptoss_random_weights", False)),
        )

    @classmethod
    def _from_original(cls, raw: dict) -> "ModelConfig":
        n_layers = int(raw["num_hidden_layers"])
        factor = float(raw.get("rope_scaling_factor", 1.0))
        initial = int(raw.get("initial_context_length", 4096))
        return cls(
            n_layers=n_layers,
            n_experts=int(raw["num_experts"]),
            n_experts_per_token=int(raw["experts_per_token"]),
            vocab_size=int(raw["vocab_size"]),
            d_model=int(raw["hidden_size"]),
            d_ff=int(raw["intermediate_size"]),
            swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
            d_head=int(raw.get("head_dim", 64)),
            n_heads=int(raw["num_attention_heads"]),
            n_kv_heads=int(raw["num_key_value_heads"]),
            sliding_window=int(raw.get("sliding_window", 128)),
            initial_context_length=initial,
            rope_theta=float(raw.get("rope_theta", 150000.0)),
            rope_scaling_factor=factor,
            rope_ntk_alpha=float(raw.get("rope_ntk_alpha", 1.0)),
            rope_ntk_beta=float(raw.get("rope_ntk_beta", 32.0)),
            max_context=int(initial * factor),
            random_weights=bool(raw.get("gptoss_random_weights", False)),
        )

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not readable JSON: {e}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} is not a JSON object")
        return cls.from_dict(raw, source=str(path))


PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-20b": ModelConfig(),
    "gpt-oss-120b": ModelConfig(n_layers=36, n_experts=128),
    # The test fixture's shape: real vocabulary, small everything else, a window that short
    # prompts cross.
    "tiny": ModelConfig(
        n_layers=4, n_experts=8, d_model=64, d_ff=64, d_head=16, n_heads=4, n_kv_heads=2,
        sliding_window=16,
    ),
    # Small enough for CPU benchmarks in CI, large enough that timings mean something.
    "small": ModelConfig(
        n_layers=4, n_experts=16, d_model=256, d_ff=256, d_head=32, n_heads=8, n_kv_heads=2,
        sliding_window=64,
    ),
}

# Where each named preset lives on the hub (only the real models have one).
PRESET_REPOS = {"gpt-oss-20b": "openai/gpt-oss-20b", "gpt-oss-120b": "openai/gpt-oss-120b"}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise CheckpointError(
            f"unknown preset {name!r}", f"choose one of {', '.join(PRESETS)}"
        ) from None

"""The gpt-oss forward pass, written once over the ops of ``ops.py``.

Pre-norm blocks: ``x += attn(rmsnorm(x))``, ``x += moe(rmsnorm(x))``; the final RMSNorm and the
untied unembedding give the logits. Attention layers alternate between a sliding window (even
layers) and full causal attention (odd layers); the cache (``cache.py``) follows the same split.
The model holds its weights as canonical tensors (``checkpoint.py``) and knows nothing about
text or sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import ops
from .cache import KVCache, KVPool, RingCache
from .config import ModelConfig


@dataclass
class Block:
    """One transformer block's weights (canonical names ``blocks.N.*``)."""

    attn_norm: torch.Tensor   # [D] float32
    qkv_w: torch.Tensor       # [H*dh + 2*K*dh, D]
    qkv_b: torch.Tensor       # [H*dh + 2*K*dh]
    sinks: torch.Tensor       # [H] float32
    out_w: torch.Tensor       # [D, H*dh]
    out_b: torch.Tensor       # [D]
    mlp_norm: torch.Tensor    # [D] float32
    router_w: torch.Tensor    # [E, D]
    router_b: torch.Tensor    # [E]
    w1_blocks: torch.Tensor   # [E, 2F, D/32, 16] uint8
    w1_scales: torch.Tensor   # [E, 2F, D/32] uint8
    w1_bias: torch.Tensor     # [E, 2F]
    w2_blocks: torch.Tensor   # [E, D, F/32, 16] uint8
    w2_scales: torch.Tensor   # [E, D, F/32] uint8
    w2_bias: torch.Tensor     # [E, D]
    window: int               # sliding window, 0 for full attention

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], i: int, window: int) -> "Block":
        p = f"blocks.{i}."
        return cls(
            attn_norm=t[p + "attn.norm.scale"], qkv_w=t[p + "attn.qkv.weight"],
            qkv_b=t[p + "attn.qkv.bias"], sinks=t[p + "attn.sinks"],
            out_w=t[p + "attn.out.weight"], out_b=t[p + "attn.out.bias"],
            mlp_norm=t[p + "mlp.norm.scale"], router_w=t[p + "mlp.router.weight"],
            router_b=t[p + "mlp.router.bias"], w1_blocks=t[p + "mlp.w1.blocks"],
            w1_scales=t[p + "mlp.w1.scales"], w1_bias=t[p + "mlp.w1.bias"],
            w2_blocks=t[p + "mlp.w2.blocks"], w2_scales=t[p + "mlp.w2.scales"],
            w2_bias=t[p + "mlp.w2.bias"], window=window,
        )


class Transformer:
    """gpt-oss over canonical tensors, for ``max_context`` positions."""

    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor], max_context: int):
        self.cfg = cfg
        self.max_context = max_context
        self.embedding = tensors["embedding.weight"]
        self.norm = tensors["norm.scale"]
        self.unembedding = tensors["unembedding.weight"]
        self.blocks = [
            Block.from_tensors(tensors, i, cfg.sliding_window if w else 0)
            for i, w in enumerate(cfg.windowed_layers)
        ]
        self.device = self.embedding.device
        self.dtype = self.embedding.dtype
        self.cos, self.sin = ops.rope_table(
            max_context, cfg.d_head, cfg.rope_theta, cfg.rope_scaling_factor,
            cfg.initial_context_length, cfg.rope_ntk_alpha, cfg.rope_ntk_beta,
            cfg.yarn_concentration, device=self.device,
        )
        self.scale = 1.0 / math.sqrt(cfg.d_head)

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.cfg, batch, self.max_context, self.dtype, self.device)

    def new_pool(self, sequences: int, max_context: int | None = None) -> KVPool:
        """Caches for ``sequences`` independent sequences (``forward_rows``), of ``max_context``
        positions each (default: the model's)."""
        return KVPool(self.cfg, sequences, max_context or self.max_context, self.dtype, self.device)

    def nbytes(self) -> int:
        seen = [self.embedding, self.norm, self.unembedding] + [
            t for b in self.blocks for t in vars(b).values() if isinstance(t, torch.Tensor)
        ]
        return sum(t.numel() * t.element_size() for t in seen)

    def attention(self, b: Block, h: torch.Tensor, layer, q_pos: torch.Tensor, start) -> torch.Tensor:
        """Attention sublayer on normed ``h`` [B, T, D] at positions ``q_pos`` [T], without the
        output projection's bias (the caller's ``add_rmsnorm_route`` adds it; the qkv bias is
        added in ``rope_store``): projections without a bias are one cuBLAS launch at decode."""
        cfg = self.cfg
        B, T, _ = h.shape
        qkv = ops.linear(h, b.qkv_w)                     # the bias rides in rope_store
        q, k, v = qkv.split((cfg.q_dim, cfg.kv_dim, cfg.kv_dim), dim=-1)
        q = q.view(B, T, cfg.n_heads, cfg.d_head)                            # [B, T, H, dh]
        k = k.view(B, T, cfg.n_kv_heads, cfg.d_head)                         # [B, T, K, dh]
        v = v.view(B, T, cfg.n_kv_heads, cfg.d_head)
        k_buf, v_buf, slots, ring_pos = layer.slots_for(q_pos, start)
        q = ops.rope_store(q, k, v, self.cos, self.sin, q_pos, k_buf, v_buf, slots, ring_pos, b.qkv_b)
        keys, values, k_pos = layer.attend(q_pos, start)
        o = ops.attention(q, keys, values, b.sinks, q_pos, k_pos, b.window, self.scale, layer.keys_by_position)
        return ops.linear(o.reshape(B, T, cfg.q_dim), b.out_w)   # out_b: added by add_rmsnorm_route

    def attention_rows(self, b: Block, h: torch.Tensor, layer, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``attention`` for N sequences of a pool, one token each: normed ``h`` [N, D], token n
        in slot ``rows[n]`` at position ``pos[n]``. Without the output bias, as ``attention``."""
        cfg = self.cfg
        N = h.shape[0]
        qkv = ops.linear(h, b.qkv_w)                                         # [N, (H + 2K) dh]
        q, k, v = qkv.split((cfg.q_dim, cfg.kv_dim, cfg.kv_dim), dim=-1)
        q = q.view(N, cfg.n_heads, cfg.d_head)
        k = k.view(N, cfg.n_kv_heads, cfg.d_head)
        v = v.view(N, cfg.n_kv_heads, cfg.d_head)
        ring = layer.pos if isinstance(layer, RingCache) else None           # [B, W] or None
        q = ops.rope_store_rows(q, k, v, self.cos, self.sin, rows, pos, layer.k, layer.v, ring, b.qkv_b)
        o = ops.attention_rows(q, layer.k, layer.v, b.sinks, rows, pos, ring, b.window, self.scale)
        return ops.linear(o.reshape(N, cfg.q_dim), b.out_w)

    def mlp(self, b: Block, h: torch.Tensor, routing) -> torch.Tensor:
        """MoE sublayer on normed ``h`` [B, T, D], routed by ``routing`` (weights, experts)."""
        cfg = self.cfg
        y = ops.moe(
            h.reshape(-1, cfg.d_model), b.router_w, b.router_b, b.w1_blocks, b.w1_scales,
            b.w1_bias, b.w2_blocks, b.w2_scales, b.w2_bias, cfg.n_experts_per_token,
            cfg.swiglu_limit, routing=routing,
        )
        return y.view(h.shape)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, start) -> torch.Tensor:
        """tokens [B, T] at positions start .. start+T-1 -> final hidden states [B, T, D].

        Writes the tokens' keys and values into ``cache``; positions before ``start`` must be
        there already. ``start`` is an int, or a 0-d device tensor for the CUDA-graph decode
        step (then the caller checks the context and keeps ``cache.length``).
        """
        T = tokens.shape[1]
        static = isinstance(start, torch.Tensor)
        if not static and start + T > self.max_context:
            raise ValueError(f"positions up to {start + T} exceed the context of {self.max_context}")
        cache.dirty = True
        eps = self.cfg.rms_norm_eps
        q_pos = torch.arange(T, device=tokens.device) + start               # [T]
        x = self.embedding[tokens]                                           # [B, T, D]
        h = ops.rmsnorm(x, self.blocks[0].attn_norm, eps)
        # pre-norm blocks, each residual add fused with the norm that follows it (and the
        # MoE's norm with its router)
        next_norms = [b.attn_norm for b in self.blocks[1:]] + [self.norm]
        k = self.cfg.n_experts_per_token
        for b, layer, next_norm in zip(self.blocks, cache.layers, next_norms):
            x, h, routing = ops.add_rmsnorm_route(
                x, self.attention(b, h, layer, q_pos, start), b.mlp_norm, eps, b.router_w, b.router_b, k, b.out_b)
            x, h = ops.add_rmsnorm(x, self.mlp(b, h, routing), next_norm, eps)
        if not static:
            cache.length = start + T
        cache.dirty = False
        return h

    @torch.inference_mode()
    def forward_rows(self, tokens: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, pool: KVPool) -> torch.Tensor:
        """One decode step of N sequences of ``pool`` at once: token ``tokens[n]`` of the sequence
        in slot ``rows[n]``, at its position ``pos[n]`` (all [N] int64 on the device) -> final
        hidden states [N, D].

        Every op but the two per-sequence ones (``rope_store_rows``, ``attention_rows``) sees the
        N tokens as N rows, so each weight is read once for all of them. Positions before each
        ``pos[n]`` must be in its slot already; the caller checks the context and keeps each
        sequence's length (nothing here reads a position on the host)."""
        eps = self.cfg.rms_norm_eps
        x = self.embedding[tokens]                                           # [N, D]
        h = ops.rmsnorm(x, self.blocks[0].attn_norm, eps)
        next_norms = [b.attn_norm for b in self.blocks[1:]] + [self.norm]
        k = self.cfg.n_experts_per_token
        for b, layer, next_norm in zip(self.blocks, pool.layers, next_norms):
            x, h, routing = ops.add_rmsnorm_route(
                x, self.attention_rows(b, h, layer, rows, pos), b.mlp_norm, eps, b.router_w, b.router_b, k, b.out_b)
            x, h = ops.add_rmsnorm(x, self.mlp(b, h, routing), next_norm, eps)
        return h

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., D] -> float32 logits [..., vocab]."""
        return ops.linear(hidden, self.unembedding).float()

"""The KV cache: preallocated for full-attention layers, a ring buffer for windowed layers.

A full layer keeps every position up to ``max_context``. A windowed layer keeps only the last
``sliding_window`` positions in a ring (slot = position mod window), so a 128k context costs it
128 slots. Each layer cache has the same small interface:

- ``slots_for(q_pos, start) -> (k_buf, v_buf, slots, ring_pos)``: where the new tokens (at
  positions ``q_pos`` [T] = start .. start+T-1) must write their k and v (``buf[:, slots[t]]``;
  or, with ``ring_pos`` given, slot ``pos mod window`` and that table updated); the forward
  writes them there with RoPE applied (``ops.rope_store``), then
- ``attend(q_pos, start) -> (keys, values, key_positions)``: what the new queries attend over,
  with each slot's absolute position (-1: empty);
- ``rewind(n)``: forget positions >= n;
- ``reset()``.

``start`` is an int, or (the CUDA-graph decode step) a device tensor: then nothing may depend on
its value on the host, so a full layer hands out its whole buffer (causality masks the slots past
the query) and the ring writes through device-side slot indices.

The ring cannot always rewind: once a position has been overwritten it is gone. ``KVCache``
therefore tracks how many positions it holds and, via ``snapshot``/``restore``, lets the engine
keep copies of the ring buffers at chosen positions (the end of each prompt) to resume from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig


class FullCache:
    """Every position of one full-attention layer: k, v [B, max_context, K, dh]."""

    keys_by_position = True       # slot n holds position n (``ops.attention``)

    def __init__(self, batch: int, max_context: int, n_kv_heads: int, d_head: int, dtype, device):
        self.k = torch.zeros(batch, max_context, n_kv_heads, d_head, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.arange(max_context, device=device)

    def slot(self, b: int) -> "FullCache":
        """Slot ``b`` of a pooled layer as a one-sequence cache over the same memory."""
        view = object.__new__(FullCache)
        view.k, view.v, view.positions = self.k[b:b + 1], self.v[b:b + 1], self.positions
        return view

    def slots_for(self, q_pos: torch.Tensor, start):
        return self.k, self.v, q_pos, None                # slot = position

    def attend(self, q_pos: torch.Tensor, start):
        if isinstance(start, torch.Tensor):               # graph decode: the whole buffer
            return self.k, self.v, self.positions
        end = start + q_pos.shape[0]
        return self.k[:, :end], self.v[:, :end], self.positions[:end]

    def rewind(self, n: int) -> None:
        """Positions >= n are overwritten before they are read again; nothing to do."""

    def reset(self) -> None:
        pass


class RingCache:
    """The last ``window`` positions of one windowed layer: k, v [B, window, K, dh]."""

    keys_by_position = False

    def __init__(self, batch: int, window: int, n_kv_heads: int, d_head: int, dtype, device, pooled: bool = False):
        self.window = window
        self.k = torch.zeros(batch, window, n_kv_heads, d_head, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # which position each slot holds (-1: empty): [W] for aligned streams; a pooled layer
        # (``KVPool``, sequences at their own positions) keeps a table per sequence, [B, W]
        self.pos = torch.full((batch, window) if pooled else (window,), -1, dtype=torch.long, device=device)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def slot(self, b: int) -> "RingCache":
        """Slot ``b`` of a pooled layer as a one-sequence ring over the same memory."""
        view = object.__new__(RingCache)
        view.window, view._pending = self.window, None
        view.k, view.v, view.pos = self.k[b:b + 1], self.v[b:b + 1], self.pos[b]
        return view

    def slots_for(self, q_pos: torch.Tensor, start):
        T, W = q_pos.shape[0], self.window
        if T == 1:                  # one token: straight into slot pos mod W (rope_store does it)
            return self.k, self.v, None, self.pos
        # Several tokens: the queries need the old ring and all new keys, so they go after a
        # copy of the ring; ``attend`` then keeps the last W new ones in the ring.
        B, _, K, dh = self.k.shape
        keys = torch.cat((self.k, self.k.new_empty(B, T, K, dh)), dim=1)  # [B, W+T, K, dh]
        values = torch.cat((self.v, self.v.new_empty(B, T, K, dh)), dim=1)
        self._pending = (keys, values)
        return keys, values, torch.arange(W, W + T, device=q_pos.device), None

    def attend(self, q_pos: torch.Tensor, start):
        T, W = q_pos.shape[0], self.window
        if T == 1:
            return self.k, self.v, self.pos
        keys, values = self._pending
        self._pending = None
        positions = torch.cat((self.pos, q_pos))
        m = min(T, W)
        slots = q_pos[-m:] % W
        self.k[:, slots] = keys[:, W + T - m:]
        self.v[:, slots] = values[:, W + T - m:]
        self.pos[slots] = q_pos[-m:]
        return keys, values, positions

    def rewind(self, n: int) -> None:
        self.pos.masked_fill_(self.pos >= n, -1)

    def reset(self) -> None:
        self.pos.fill_(-1)


@dataclass
class RingSnapshot:
    """Copies of every ring buffer after ``length`` positions, and the logits at the last one."""

    length: int
    rings: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    logits: torch.Tensor | None = None


def _layers(cfg: ModelConfig, batch: int, max_context: int, dtype, device, pooled: bool = False) -> list:
    return [
        RingCache(batch, cfg.sliding_window, cfg.n_kv_heads, cfg.d_head, dtype, device, pooled)
        if windowed
        else FullCache(batch, max_context, cfg.n_kv_heads, cfg.d_head, dtype, device)
        for windowed in cfg.windowed_layers
    ]


class KVCache:
    """The caches of all layers of one model, for ``batch`` aligned streams."""

    def __init__(self, cfg: ModelConfig, batch: int, max_context: int, dtype, device, layers: list | None = None):
        self.cfg = cfg
        self.max_context = max_context
        self.layers = layers if layers is not None else _layers(cfg, batch, max_context, dtype, device)
        self.length = 0  # positions 0 .. length-1 are held (full layers) or were seen (rings)
        self.dirty = False  # a forward was interrupted: the rings may hold half-written state

    @property
    def rings(self) -> list[RingCache]:
        return [c for c in self.layers if isinstance(c, RingCache)]

    def can_rewind(self, n: int) -> bool:
        """Whether forgetting positions >= n leaves the rings what position n's query needs
        (positions n-W+1 .. n-1); the rings hold positions length-W .. length-1."""
        if n > self.length:
            return False
        W = self.cfg.sliding_window
        if self.dirty:
            return not self.rings
        return not self.rings or n == self.length or max(0, n - W + 1) >= max(0, self.length - W)

    def rewind(self, n: int) -> None:
        for c in self.layers:
            c.rewind(n)
        self.length = min(self.length, n)
        if not self.rings:
            self.dirty = False

    def reset(self) -> None:
        for c in self.layers:
            c.reset()
        self.length = 0
        self.dirty = False

    def snapshot(self, logits: torch.Tensor | None = None) -> RingSnapshot:
        rings = [(c.k.clone(), c.v.clone(), c.pos.clone()) for c in self.rings]
        return RingSnapshot(self.length, rings, None if logits is None else logits.clone())

    def restore(self, snap: RingSnapshot) -> None:
        """Back to ``snap.length`` positions: rings from the copy, full layers just forget."""
        for c, (k, v, pos) in zip(self.rings, snap.rings):
            c.k.copy_(k)
            c.v.copy_(v)
            c.pos.copy_(pos)
        for c in self.layers:
            if isinstance(c, FullCache):
                c.rewind(snap.length)
        self.length = snap.length
        self.dirty = False


class KVPool:
    """The caches of ``sequences`` independent sequences, each in its own slot of every layer's
    buffers ([B, S, K, dh]; a ring's position table is [B, W]), at its own position: the batched
    decode step (``Transformer.forward_rows``) reads and writes them all in one launch per op,
    each token through its slot index. ``sequence(b)`` is slot b as a ``KVCache`` over the same
    memory, which the one-sequence forward (a joining sequence's prefill, prefix reuse, ring
    snapshots) uses unchanged.

    One more slot than asked for, the last, is scratch: rows that only pad a batch to the size its
    CUDA graph was captured for write there, and nothing reads it.
    """

    def __init__(self, cfg: ModelConfig, sequences: int, max_context: int, dtype, device):
        self.cfg = cfg
        self.sequences = sequences
        self.max_context = max_context
        self.layers = _layers(cfg, sequences + 1, max_context, dtype, device, pooled=True)

    @property
    def scratch(self) -> int:
        return self.sequences

    def sequence(self, b: int) -> KVCache:
        if not 0 <= b < self.sequences:
            raise IndexError(f"slot {b} of {self.sequences}")
        return KVCache(self.cfg, 1, self.max_context, None, None, layers=[c.slot(b) for c in self.layers])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.layers for t in (c.k, c.v))

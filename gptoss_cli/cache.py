"""The KV cache: preallocated for full-attention layers, a ring buffer for windowed layers.

A full layer keeps every position up to ``max_context``. A windowed layer keeps only the last
``sliding_window`` positions in a ring (slot = position mod window), so a 128k context costs it
128 slots. Each layer cache has the same small interface:

- ``update(k, v, start) -> (keys, values, key_positions)``: store the new tokens' k/v (written at
  positions start .. start+T-1) and return what the new queries attend over, with each slot's
  absolute position (-1: empty);
- ``rewind(n)``: forget positions >= n;
- ``reset()``.

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

    def __init__(self, batch: int, max_context: int, n_kv_heads: int, d_head: int, dtype, device):
        self.k = torch.zeros(batch, max_context, n_kv_heads, d_head, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.arange(max_context, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int):
        end = start + k.shape[1]
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end], self.positions[:end]

    def rewind(self, n: int) -> None:
        """Positions >= n are overwritten before they are read again; nothing to do."""

    def reset(self) -> None:
        pass


class RingCache:
    """The last ``window`` positions of one windowed layer: k, v [B, window, K, dh]."""

    def __init__(self, batch: int, window: int, n_kv_heads: int, d_head: int, dtype, device):
        self.window = window
        self.k = torch.zeros(batch, window, n_kv_heads, d_head, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((window,), -1, dtype=torch.long, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int):
        T, W = k.shape[1], self.window
        new_pos = torch.arange(start, start + T, device=k.device)
        if T == 1:
            slot = start % W
            self.k[:, slot] = k[:, 0]
            self.v[:, slot] = v[:, 0]
            self.pos[slot] = start
            return self.k, self.v, self.pos
        # Several tokens: the queries need the old ring and all new keys, so attend over both,
        # then keep the last W new ones in the ring.
        keys = torch.cat((self.k, k), dim=1)
        values = torch.cat((self.v, v), dim=1)
        positions = torch.cat((self.pos, new_pos))
        m = min(T, W)
        slots = new_pos[-m:] % W
        self.k[:, slots] = k[:, -m:]
        self.v[:, slots] = v[:, -m:]
        self.pos[slots] = new_pos[-m:]
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


class KVCache:
    """The caches of all layers of one model, for ``batch`` aligned streams."""

    def __init__(self, cfg: ModelConfig, batch: int, max_context: int, dtype, device):
        self.cfg = cfg
        self.max_context = max_context
        self.layers = [
            RingCache(batch, cfg.sliding_window, cfg.n_kv_heads, cfg.d_head, dtype, device)
            if windowed
            else FullCache(batch, max_context, cfg.n_kv_heads, cfg.d_head, dtype, device)
            for windowed in cfg.windowed_layers
        ]
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

    def nbytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.layers)

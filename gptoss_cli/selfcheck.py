"""Every fast op checked against its PyTorch reference on this machine; a fallback where one fails.

No Triton kernel of ours has met every GPU, nor the native CPU library every CPU (AVX-512 or not,
BF16 or not). As llama.cpp's ``test-backend-ops`` does, the fast implementation of each dispatched
op (``ops.fast_impl``: a Triton kernel, or the native CPU version) runs beside its reference
(``op.reference``) on the same inputs, and everything it returns or writes in place (the KV
cache, the ring's position table) is compared within a tolerance for the activation dtype.

- ``cases(model, quick)``: the inputs. Weights are the model's own (its first windowed and first
  full layer), activations random. The full set (``gptoss doctor``) has the real shapes and the
  edges: one token, the native library's 16-row limit, a prompt that crosses the window, a ring
  that has wrapped, a live length of 1, 128 experts, a NaN router logit. The quick set (the
  engine's load check) is one decode and one short prefill per op, with the experts cut to
  ``256 + F mod 256`` of their F outputs: the reference dequantises whole experts (seconds per
  token on a CPU at gpt-oss's width), and the cut keeps the tails of 32- to 256-wide tiles.
- ``run_case``: one comparison, optionally timed.
- ``check_engine``: the load check. Its result is cached under ``cache_dir()/selfcheck``, keyed by
  the device, driver, torch, triton, gptoss version, the kernels' sources and the model's shapes;
  an op that fails is switched to its reference for the process (``ops.fall_back``), with one
  warning naming it. The answer stays right; only that op is slower.

Rows whose router logits nearly tie at the k-th expert (two implementations may round them
apart) are not held to the same expert choice; each comparison says how many it let pass.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__, ops

CHECK_ENV = "GPTOSS_CHECK"          # 0: no load check (the raw path)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
TIE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}   # 2 ulps of the logits
WARNING_PREFIX = "gptoss check: "


@dataclass
class Case:
    """One op called on one set of inputs."""

    op: str                            # the name of the op in ``ops.OPS``
    label: str                         # what the inputs are, for the table
    args: tuple
    kwargs: dict = field(default_factory=dict)
    writes: tuple[int, ...] = ()       # indices of ``args`` the op writes in place (compared too)
    nbytes: int = 0                    # bytes one call must read and write (for GB/s)
    check: str = "close"               # close | route (returns ..., (weights, experts)) | valid-route
    rows: int = 1                      # token rows (the native CPU ops take a few, see cpu_ops.MAX_ROWS)


@dataclass
class Result:
    op: str
    label: str
    ok: bool
    max_abs: float = 0.0
    rel: float = 0.0
    tol: float = 0.0
    error: str | None = None           # what the fast implementation raised
    note: str = ""
    us: float | None = None            # time per call of the fast implementation
    gbps: float | None = None

    def why(self) -> str:
        """One line: what went wrong."""
        if self.error:
            return f"{self.label}: {self.error}"
        return f"{self.label}: rel err {self.rel:.2g} > {self.tol:.0e}" + (f" ({self.note})" if self.note else "")


# ---- inputs ---------------------------------------------------------------------------------------
class _Inputs:
    """Random tensors on one device, from one seeded generator."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int):
        self.device, self.dtype = device, dtype
        self.g = torch.Generator(device=device).manual_seed(seed)

    def randn(self, *shape, dtype=None, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=self.g, device=self.device) * scale
        return x.to(dtype or self.dtype)

    def codes(self, *shape) -> torch.Tensor:
        return torch.randint(0, 256, shape, generator=self.g, device=self.device, dtype=torch.uint8)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _layers(model):
    """(the first windowed block, the first full block); either stands in for a missing other."""
    windowed = next((b for b in model.blocks if b.window), model.blocks[0])
    full = next((b for b in model.blocks if not b.window), model.blocks[0])
    return windowed, full


def _cut_experts(b, n_out: int) -> dict:
    """Block ``b``'s experts with F cut to ``n_out`` outputs (a multiple of 32), contiguous."""
    return {
        "w1_blocks": b.w1_blocks[:, :2 * n_out].contiguous(), "w1_scales": b.w1_scales[:, :2 * n_out].contiguous(),
        "w1_bias": b.w1_bias[:, :2 * n_out].contiguous(),
        "w2_blocks": b.w2_blocks[:, :, :n_out // 32].contiguous(), "w2_scales": b.w2_scales[:, :, :n_out // 32].contiguous(),
        "w2_bias": b.w2_bias,
    }


def _expert_bytes(w: dict) -> int:
    """Bytes of one expert's weights (both matrices, scales and biases)."""
    return sum(t[0].numel() * t.element_size() for t in w.values())


def cases(model, quick: bool = False, seed: int = 0) -> list[Case]:
    """The inputs every fast op is checked on, at ``model``'s shapes (see the module docstring)."""
    cfg = model.cfg
    dev, dt = model.device, model.dtype
    inp = _Inputs(dev, dt, seed)
    D, H, dh, k = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_experts_per_token
    W, S = cfg.sliding_window, model.max_context
    eps = cfg.rms_norm_eps
    wb, fb = _layers(model)
    # a prefill; the full set's crosses the window where the context allows
    P = min(8, S - 1) if quick else max(min(8, S - 1), min(W + 22, S - 40))
    out: list[Case] = []

    # norms, and the router fused with the residual add and the norm
    for T in ((1, P) if quick else (1, 16, P)):
        x, delta = inp.randn(1, T, D), inp.randn(1, T, D)
        rows = f"{T} token{'s' * (T > 1)}"
        out.append(Case("rmsnorm", rows, (x, fb.attn_norm, eps), nbytes=2 * _nbytes(x), rows=T))
        out.append(Case("add_rmsnorm", rows, (x, delta, fb.mlp_norm, eps), nbytes=4 * _nbytes(x), rows=T))
        route_args = (fb.router_w, fb.router_b, k)
        out.append(Case("add_rmsnorm_route", rows, (x, delta, fb.mlp_norm, eps, *route_args, fb.out_b),
                        nbytes=4 * _nbytes(x) + _nbytes(fb.router_w), check="route", rows=T))
        out.append(Case("route", rows, (x[0], *route_args), nbytes=_nbytes(x, fb.router_w), check="route", rows=T))
    if not quick:
        E = 128
        rw, rb = inp.randn(E, D, scale=D ** -0.5), inp.randn(E, scale=0.1)
        x, delta = inp.randn(1, 4, D), inp.randn(1, 4, D)
        out.append(Case("add_rmsnorm_route", f"4 tokens, {E} experts",
                        (x, delta, fb.mlp_norm, eps, rw, rb, k, fb.out_b), check="route", rows=4))
        out.append(Case("route", f"4 tokens, {E} experts", (x[0], rw, rb, k), check="route", rows=4))
        nan_w = fb.router_w.clone()
        nan_w[1] = float("nan")                       # expert 1's logit is NaN for every token
        out.append(Case("add_rmsnorm_route", "NaN router logit", (x, delta, fb.mlp_norm, eps, nan_w, fb.router_b, k),
                        check="valid-route", rows=4))
        out.append(Case("route", "NaN router logit", (x[0], nan_w, fb.router_b, k), check="valid-route", rows=4))

    out += _rope_cases(model, inp, wb, fb, P, quick)
    out += _attention_cases(model, inp, wb, fb, P, quick)
    out += _moe_cases(model, inp, fb, P, quick)
    out += _rows_cases(model, inp, wb, fb, quick)

    # the projections: native on CPU (bf16, a few rows)
    for T in ((1,) if quick else (1, 16)):
        x = inp.randn(1, T, D)
        out.append(Case("linear", f"qkv, {T} token{'s' * (T > 1)}", (x, fb.qkv_w), nbytes=_nbytes(x, fb.qkv_w), rows=T))
    if not quick:
        o = inp.randn(1, 1, H * dh)
        out.append(Case("linear", "out, 1 token", (o, fb.out_w), nbytes=_nbytes(o, fb.out_w)))
        h = inp.randn(1, D)
        out.append(Case("linear", "unembedding, 1 token", (h, model.unembedding), nbytes=_nbytes(model.unembedding)))
    return out


def _wrapped(W: int, S: int) -> int:
    """A position at which the ring of W slots has gone round three times, within a context of S
    positions (RoPE's table has no row past it; a short context caps it there)."""
    return min(3 * W + 5, S - 1)


def _rope_cases(model, inp: _Inputs, wb, fb, P: int, quick: bool) -> list[Case]:
    cfg = model.cfg
    H, K, dh, W, S = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.sliding_window, model.max_context
    dev = model.device
    out = []

    def qkv(T):
        return inp.randn(1, T, H, dh), inp.randn(1, T, K, dh), inp.randn(1, T, K, dh)

    def case(label, T, cache_len, pos, slots, ring_pos, bias):
        q, k, v = qkv(T)
        kc, vc = inp.randn(1, cache_len, K, dh), inp.randn(1, cache_len, K, dh)
        args = (q, k, v, model.cos, model.sin, pos, kc, vc, slots, ring_pos, bias)
        writes = (6, 7) if ring_pos is None else (6, 7, 9)
        return Case("rope_store", label, args, writes=writes, nbytes=3 * _nbytes(q) + 4 * _nbytes(k), rows=T)

    p = min(2047, S - 1)                                   # the cache only needs to hold p
    out.append(case(f"decode, full cache at {p}", 1, min(S, p + 64), torch.tensor([p], device=dev),
                    torch.tensor([p], device=dev), None, fb.qkv_b))
    wrapped = _wrapped(W, S)                               # the ring has gone round three times
    ring = torch.tensor([wrapped - ((wrapped - s) % W) for s in range(W)], device=dev)   # slot s's position
    out.append(case(f"decode, ring wrapped at {wrapped}", 1, W, torch.tensor([wrapped], device=dev), None,
                    ring, wb.qkv_b))
    start = max(0, min(37, S - P))                         # positions within the context
    pos = torch.arange(start, start + P, device=dev)
    out.append(case(f"prefill {P} at {start}, full cache", P, min(S, start + P + 64), pos, pos, None, fb.qkv_b))
    if not quick:
        out.append(case(f"prefill {P} at {start}, ring layout", P, W + P, pos, torch.arange(W, W + P, device=dev),
                        None, wb.qkv_b))
    return out


def _attention_cases(model, inp: _Inputs, wb, fb, P: int, quick: bool) -> list[Case]:
    cfg = model.cfg
    H, K, dh, W, S = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.sliding_window, model.max_context
    dev, scale = model.device, model.scale
    out = []

    def case(label, T, q_pos, k_pos, window, sinks, by_position, live):
        q = inp.randn(1, T, H, dh)
        k, v = inp.randn(1, k_pos.shape[0], K, dh), inp.randn(1, k_pos.shape[0], K, dh)
        nbytes = 2 * _nbytes(q) + 2 * live * K * dh * k.element_size()
        return Case("attention", label, (q, k, v, sinks, q_pos, k_pos, window, scale, by_position), nbytes=nbytes,
                    rows=T)

    arange = functools.partial(torch.arange, device=dev)
    live = min(2048, S)
    out.append(case(f"decode, full, live {live} of {S}", 1, arange(live - 1, live), arange(S), 0, fb.sinks, True, live))
    wrapped = 3 * W + 5
    ring = torch.tensor([wrapped - ((wrapped - s) % W) for s in range(W)], device=dev)
    out.append(case(f"decode, window {W}, ring wrapped", 1, arange(wrapped, wrapped + 1), ring, W, wb.sinks, False, W))
    start = W + 5                                          # a prompt after a full ring: crosses the window
    ring = torch.tensor([start - W + ((s - start) % W) for s in range(W)], device=dev)
    out.append(case(f"prefill {P} at {start}, window {W}", P, arange(start, start + P),
                    torch.cat((ring, arange(start, start + P))), W, wb.sinks, False, W + P))
    if not quick:
        empty = torch.full((W,), -1, device=dev)
        empty[0] = 0
        out.append(case("decode, full, live 1", 1, arange(0, 1), arange(S), 0, fb.sinks, True, 1))
        out.append(case(f"decode, window {W}, live 1", 1, arange(0, 1), empty, W, wb.sinks, False, 1))
        out.append(case(f"prefill {P} from 0, full", P, arange(P), arange(P), 0, fb.sinks, True, P))
        out.append(case(f"prefill {P} at 37, full", P, arange(37, 37 + P), arange(37 + P), 0, fb.sinks, True, 37 + P))
    return out


def _rows_cases(model, inp: _Inputs, wb, fb, quick: bool) -> list[Case]:
    """The batched decode step's ops: N sequences, one token each, in rows 1.. of a pooled cache
    (out of order) at their own positions; row 0 is the scratch row that padding tokens point at
    (their inputs are equal, so whichever writes last writes the same)."""
    cfg = model.cfg
    H, K, dh, W, S = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.sliding_window, model.max_context
    dev, scale = model.device, model.scale
    S_full = min(S, 2048 + 64)                             # a full layer's slots: positions < S_full
    far = S_full - 1

    def batch(positions, n_pad):
        """(rows, pos) [N] on the device: real tokens in rows len..1 (reversed), pads in row 0 at 0."""
        n = len(positions)
        rows = list(range(n, 0, -1)) + [0] * n_pad
        return (torch.tensor(rows, device=dev), torch.tensor(list(positions) + [0] * n_pad, device=dev))

    def tokens(N, n_pad, heads):
        x = inp.randn(N - n_pad, heads, dh)
        return torch.cat((x, x[:1].expand(n_pad, heads, dh))) if n_pad else x

    def ring_table(rows, pos, B):
        """[B, W]: what each slot of each row's ring holds after this step (slot s: the last
        position p' <= pos with p' = s mod W; -1 before the first)."""
        table = torch.full((B, W), -1, dtype=torch.long)
        for r, p in zip(rows.tolist(), pos.tolist()):
            held = torch.tensor([p - ((p - s) % W) for s in range(W)])
            table[r] = torch.where(held >= 0, held, -1)
        return table.to(dev)

    def rope(label, positions, n_pad, ring, b):
        if any(p >= S for p in positions):                 # RoPE's table holds the context's positions
            positions = tuple(min(p, S - 1) for p in positions)
            label += f" (positions capped at {S - 1})"
        rows, pos = batch(positions, n_pad)
        N, B = rows.shape[0], len(positions) + 1
        q, k, v = tokens(N, n_pad, H), tokens(N, n_pad, K), tokens(N, n_pad, K)
        slots = W if ring else S_full
        kc, vc = inp.randn(B, slots, K, dh), inp.randn(B, slots, K, dh)
        table = ring_table(rows, pos - 1, B) if ring else None    # before this step's write
        args = (q, k, v, model.cos, model.sin, rows, pos, kc, vc, table, b)
        return Case("rope_store_rows", label, args, writes=(7, 8, 9) if ring else (7, 8),
                    nbytes=3 * _nbytes(q) + 4 * _nbytes(k), rows=N)

    def attend(label, positions, n_pad, window, sinks):
        if not window and any(p >= S_full for p in positions):   # a full layer holds S_full slots
            positions = tuple(min(p, S_full - 1) for p in positions)
            label += f" (positions capped at {S_full - 1})"
        rows, pos = batch(positions, n_pad)
        N, B = rows.shape[0], len(positions) + 1
        q = tokens(N, n_pad, H)
        slots = W if window else S_full
        kc, vc = inp.randn(B, slots, K, dh), inp.randn(B, slots, K, dh)
        table = ring_table(rows, pos, B) if window else None
        live = sum(min(p + 1, W) if window else p + 1 for p in pos.tolist())
        return Case("attention_rows", label, (q, kc, vc, sinks, rows, pos, table, window, scale),
                    nbytes=2 * _nbytes(q) + 2 * live * K * dh * kc.element_size(), rows=N)

    wrapped = _wrapped(W, S)
    out = [rope(f"3 sequences, ring wrapped at {wrapped}", (wrapped, W + 1, 7), 0, True, wb.qkv_b),
           attend(f"3 sequences, full, at {far}, 100, 0", (far, 100, 0), 0, 0, fb.sinks)]
    if not quick:
        out.append(rope(f"4 sequences, full, at {far}, 37, 0, 1000", (far, 37, 0, min(1000, far)), 0, False, fb.qkv_b))
        out.append(rope("3 sequences + 2 padding, full", (5, far, 64), 2, False, fb.qkv_b))
        out.append(rope("3 sequences + 2 padding, ring", (wrapped, 2, W), 2, True, wb.qkv_b))
        out.append(attend(f"4 sequences, window {W}, ring wrapped or not", (wrapped, W - 1, 0, 2 * W), 0, W, wb.sinks))
        out.append(attend("3 sequences + 2 padding, full", (far, 5, 64), 2, 0, fb.sinks))
        out.append(attend(f"3 sequences + 2 padding, window {W}", (wrapped, 5, W), 2, W, wb.sinks))
        out.append(attend(f"32 sequences, window {W}", tuple(range(W - 16, W + 16)), 0, W, wb.sinks))
    return out


def _moe_cases(model, inp: _Inputs, fb, P: int, quick: bool) -> list[Case]:
    cfg = model.cfg
    D, k, F_ = cfg.d_model, cfg.n_experts_per_token, cfg.d_ff
    cut = min(F_, 256 + F_ % 256)
    out = []

    def case(label, T, w, router_w, router_b, n_experts=None):
        """``n_experts``: route among the first ones only (several tokens per expert, fewer
        experts for the reference to dequantise)."""
        x = inp.randn(T, D)
        routing = ops.route.reference(x, router_w[:n_experts], router_b[:n_experts], k)
        used = int(torch.unique(routing[1]).numel())
        args = (x, router_w, router_b, w["w1_blocks"], w["w1_scales"], w["w1_bias"], w["w2_blocks"],
                w["w2_scales"], w["w2_bias"], k, cfg.swiglu_limit)
        return Case("moe", label, args, {"routing": routing}, nbytes=used * _expert_bytes(w) + 2 * _nbytes(x),
                    rows=T)

    full = {n: getattr(fb, n) for n in ("w1_blocks", "w1_scales", "w1_bias", "w2_blocks", "w2_scales", "w2_bias")}
    if quick:
        w = _cut_experts(fb, cut)
        out.append(case(f"decode 1 token, F cut to {cut}", 1, w, fb.router_w, fb.router_b))
        n = min(cfg.n_experts, 2 * k)
        out.append(case(f"prefill {P} over {n} experts, F cut to {cut}", P, w, fb.router_w, fb.router_b, n))
        return out
    for T in (1, 4, 16, P):
        out.append(case(f"{T} token{'s' * (T > 1)}", T, full, fb.router_w, fb.router_b))
    E = 128
    w = {"w1_blocks": inp.codes(E, 2 * cut, D // 32, 16),
         "w1_scales": torch.randint(121, 125, (E, 2 * cut, D // 32), generator=inp.g, device=inp.device, dtype=torch.uint8),
         "w1_bias": inp.randn(E, 2 * cut), "w2_blocks": inp.codes(E, D, cut // 32, 16),
         "w2_scales": torch.randint(121, 125, (E, D, cut // 32), generator=inp.g, device=inp.device, dtype=torch.uint8),
         "w2_bias": inp.randn(E, D)}
    rw, rb = inp.randn(E, D, scale=D ** -0.5), inp.randn(E, scale=0.1)
    out.append(case(f"4 tokens, {E} experts, F cut to {cut}", 4, w, rw, rb))
    return out


# ---- comparing ------------------------------------------------------------------------------------
def _flatten(x) -> list:
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _flatten(item)]
    return [x]


def _compare(fast: list, ref: list, tol: float) -> tuple[float, float, str]:
    """(max abs error, max relative error, what differs beyond numbers) over paired outputs."""
    worst_abs = worst_rel = 0.0
    for a, b in zip(fast, ref):
        if not isinstance(b, torch.Tensor):
            continue
        if not isinstance(a, torch.Tensor) or a.shape != b.shape:
            return float("inf"), float("inf"), f"shape {tuple(getattr(a, 'shape', ()))}, expected {tuple(b.shape)}"
        if not b.dtype.is_floating_point:
            if not torch.equal(a.cpu(), b.cpu()):
                return float("inf"), float("inf"), "integer outputs differ"
            continue
        a, b = a.float(), b.float()
        if not torch.equal(torch.isnan(a), torch.isnan(b)):
            return float("inf"), float("inf"), "NaN where the reference has none (or the reverse)"
        diff = (a - b).nan_to_num(0.0).abs().max().item() if a.numel() else 0.0
        scale = b.nan_to_num(0.0).abs().max().item() if b.numel() else 0.0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(scale, 1e-30))
    return worst_abs, worst_rel, ""


def _routing_check(case: Case, fast_out, ref_out, dtype, tol: float) -> tuple[float, float, str]:
    """Compare the leading outputs as numbers, then the routing (weights [N, k], experts [N, k]) of
    the rows whose reference logits do not nearly tie at the k-th expert, as sets of experts."""
    (wf, ef), (wr, er) = fast_out[-1], ref_out[-1]
    max_abs, rel, bad = _compare(_flatten(fast_out[:-1]), _flatten(ref_out[:-1]), tol)
    fused = case.op == "add_rmsnorm_route"
    h = ref_out[1] if fused else case.args[0]                   # the rows the router saw
    rw, rb = case.args[4:6] if fused else case.args[1:3]
    E, k = rw.shape[0], ef.shape[-1]
    ids = ef.reshape(-1, k).cpu()
    if bad or ids.min() < 0 or ids.max() >= E:
        return float("inf"), float("inf"), bad or f"expert ids outside 0..{E - 1}"
    if any(len(set(row)) != k for row in ids.tolist()):
        return float("inf"), float("inf"), "an expert chosen twice for one token"
    if case.check == "valid-route":
        return max_abs, rel, ""
    logits = F.linear(h.reshape(-1, h.shape[-1]), rw, rb).float()            # [N, E]
    top = torch.topk(logits, min(k + 1, E), dim=-1).values
    clear = torch.ones(top.shape[0], dtype=torch.bool, device=top.device)
    if E > k:
        clear = (top[:, k - 1] - top[:, k]) > TIE[dtype] * top.abs().max(dim=-1).values
    clear = clear.cpu()
    order_f, order_r = ef.reshape(-1, k).cpu().sort(-1), er.reshape(-1, k).cpu().sort(-1)
    if not torch.equal(order_f.values[clear], order_r.values[clear]):
        return float("inf"), float("inf"), "another set of experts chosen"
    wf_sorted = wf.reshape(-1, k).float().cpu().gather(-1, order_f.indices)[clear]
    wr_sorted = wr.reshape(-1, k).float().cpu().gather(-1, order_r.indices)[clear]
    w_abs, w_rel, bad = _compare([wf_sorted], [wr_sorted], tol)
    ties = int((~clear).sum())
    return max(max_abs, w_abs), max(rel, w_rel), bad or (f"{ties} near-tie row(s) not compared" if ties else "")


def one_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:200]


def _fresh_args(case: Case) -> list:
    return [a.clone() if i in case.writes else a for i, a in enumerate(case.args)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, fast, device: torch.device, dtype: torch.dtype, time_it: bool = False) -> Result:
    """Run ``fast`` and the op's reference on the case's inputs and compare what they give."""
    tol = TOLERANCE[dtype]
    ref_args = _fresh_args(case)
    ref_out = ops.OPS[case.op].reference(*ref_args, **case.kwargs)
    ref_all = [ref_out, *(ref_args[i] for i in case.writes)]
    args = _fresh_args(case)
    try:
        out = fast(*args, **case.kwargs)
        _sync(device)
    except Exception as e:  # noqa: BLE001  (what a broken kernel raises is unknown: report it)
        return Result(case.op, case.label, False, tol=tol, error=one_line(e))
    fast_all = [out, *(args[i] for i in case.writes)]
    if case.check == "close":
        max_abs, rel, bad = _compare(_flatten(fast_all), _flatten(ref_all), tol)
    else:
        max_abs, rel, bad = _routing_check(case, _flatten(out)[:-2] + [tuple(_flatten(out)[-2:])],
                                           _flatten(ref_out)[:-2] + [tuple(_flatten(ref_out)[-2:])], dtype, tol)
        if case.writes:
            extra = _compare(_flatten(fast_all[1:]), _flatten(ref_all[1:]), tol)
            max_abs, rel = max(max_abs, extra[0]), max(rel, extra[1])
    ok = rel <= tol
    result = Result(case.op, case.label, ok, max_abs, rel, tol, note=bad)
    if time_it and ok:
        result.us = _time_per_call(fast, args, case.kwargs, device) * 1e6
        result.gbps = case.nbytes / result.us / 1e3 if case.nbytes else None
    return result


def _time_per_call(fn, args, kwargs, device, budget_s: float = 0.2, most: int = 100) -> float:
    fn(*args, **kwargs)
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while n < most and (n < 3 or time.perf_counter() - t0 < budget_s):
        fn(*args, **kwargs)
        n += 1
        if device.type != "cuda":
            continue
        if n in (3, 10, 30):
            _sync(device)
    _sync(device)
    return (time.perf_counter() - t0) / n


def _runs_fast(case: Case, device: torch.device) -> bool:
    """Whether the fast implementation computes this case itself: the native CPU ops hand more
    than a few rows (a prefill) to the reference, which needs no check against itself."""
    if device.type != "cpu" or ops.use_kernels(device):
        return True
    from .cpu_ops import MAX_ROWS

    return case.rows <= MAX_ROWS.get(case.op, case.rows)


def check_ops(model, quick: bool = False, time_it: bool = False, progress=None) -> list[Result]:
    """Every case of ``cases(model, quick)`` whose op has a fast implementation on the model's
    device that computes it, in order. ``progress(i, n, case)`` is called before each."""
    todo = [(c, ops.fast_impl(c.op, model.device)) for c in cases(model, quick)]
    todo = [(c, fast) for c, fast in todo if fast is not None and _runs_fast(c, model.device)]
    results = []
    for i, (case, fast) in enumerate(todo):
        if progress:
            progress(i, len(todo), case)
        results.append(run_case(case, fast, model.device, model.dtype, time_it))
    return results


# ---- the check at load ----------------------------------------------------------------------------
_DONE: dict[str, dict[str, str]] = {}     # cache key -> failed ops (name -> why), this process


@functools.cache
def _source_hash() -> str:
    """A digest of the kernels' and the native library's sources: a changed kernel is checked anew."""
    h = hashlib.sha256()
    try:
        from importlib.util import find_spec

        spec = find_spec("gptoss_kernels")
        roots = [] if spec is None or not spec.submodule_search_locations else list(spec.submodule_search_locations)
    except (ImportError, ValueError):
        roots = []
    paths = [p for root in roots for p in sorted(Path(root).glob("*.py"))]
    for p in paths:
        h.update(p.read_bytes())
    for name in ("cpu_ops.py", "ops.py", "csrc/cpu_ops.cpp", "csrc/small_ops.cpp", "csrc/bf16.h"):
        h.update((files("gptoss_cli") / name).read_bytes())
    return h.hexdigest()[:16]


def driver_version() -> str | None:
    """The NVIDIA driver's version (nvidia-smi), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_facts(device: torch.device) -> dict:
    """What the check's result depends on besides the model: device, driver, versions."""
    facts = {"device": str(device.type), "torch": torch.__version__, "gptoss": __version__,
             "sources": _source_hash(), "kernels": os.environ.get(ops.KERNELS_ENV, "auto")}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    if device.type == "cuda":
        facts["device_name"] = torch.cuda.get_device_name(device)
        facts["driver"] = driver_version()
        facts["cuda"] = torch.version.cuda
    else:
        from .cpu_ops import _cpu_flags, cpu_name, status

        facts["device_name"] = cpu_name()
        facts["cpu_flags"] = hashlib.sha256(_cpu_flags().encode()).hexdigest()[:16]
        facts["native"] = status()
    return facts


def _key(model) -> tuple[str, dict]:
    cfg = model.cfg
    shapes = {"d_model": cfg.d_model, "d_ff": cfg.d_ff, "heads": [cfg.n_heads, cfg.n_kv_heads, cfg.d_head],
              "experts": [cfg.n_experts, cfg.n_experts_per_token], "window": cfg.sliding_window,
              "context": model.max_context, "dtype": str(model.dtype).removeprefix("torch.")}
    facts = {**machine_facts(model.device), "shapes": shapes}
    blob = json.dumps(facts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20], facts


def _cache_file(key: str):
    from .resolve import cache_dir

    return cache_dir() / "selfcheck" / f"{key}.json"


def _read_cached(key: str) -> dict[str, str] | None:
    try:
        data = json.loads(_cache_file(key).read_text())
        return {str(k): str(v) for k, v in data["failed"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_cached(key: str, facts: dict, failed: dict[str, str], seconds: float) -> None:
    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"facts": facts, "failed": failed, "seconds": round(seconds, 3)}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass                    # a read-only cache only costs the check again next time


def check_engine(model) -> dict[str, str]:
    """The load check for ``model``'s device: the quick cases, once per machine, versions and shapes
    (cached on disk); each failing op is switched to its reference (``ops.fall_back``) with one
    warning. Returns the ops that fell back: name -> why. ``GPTOSS_CHECK=0`` skips it."""
    if os.environ.get(CHECK_ENV, "1") == "0":
        return {}
    if not any(ops.fast_impl(name, model.device) for name in ops.OPS):
        return {}
    key, facts = _key(model)
    if key not in _DONE:
        failed = _read_cached(key)
        if failed is None:
            t0 = time.perf_counter()
            failed = {}
            for r in check_ops(model, quick=True):
                if not r.ok and r.op not in failed:
                    failed[r.op] = r.why()
            _write_cached(key, facts, failed, time.perf_counter() - t0)
        _DONE[key] = failed
    for name, why in _DONE[key].items():
        if name not in ops.fallbacks(model.device):
            ops.fall_back(name, model.device, why)
            warnings.warn(fallback_line(name, why), RuntimeWarning, stacklevel=3)
    return dict(_DONE[key])


@contextlib.contextmanager
def quiet():
    """Silence the load check's Python warnings (a command line says them in its own words)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=WARNING_PREFIX, category=RuntimeWarning)
        yield


def fallback_line(name: str, why: str) -> str:
    return (f"{WARNING_PREFIX}the fast {name} failed its check on this machine ({why}); it runs its "
            "PyTorch reference instead (right, slower). `gptoss doctor` shows every op")

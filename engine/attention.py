"""Causal self-attention over the KV cache, for one micro-batch in one forward step.

The executor builds one `Attention` per micro-batch per step (masks and RoPE tables are computed
once there and shared by all layers); family code calls `attn.rope(q)` and `attn(layer, q, k, v)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tiermem.engine.kv_cache import KVCache
from tiermem.kernels import ops


def causal_mask(key_mask: torch.Tensor, start: int, window: int | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, T, S] (True = attend) for queries at slots start..S-1 over keys 0..S-1.

    key_mask [B, S] marks real tokens. A query may see earlier real keys (within `window` slots if
    given, as HF's sliding window: k > q - window) and always itself, so no row is empty (a padding
    query attends only to itself: finite output, never NaN).
    """
    S = key_mask.shape[1]
    q_idx = torch.arange(start, S, device=key_mask.device)[:, None]  # [T, 1]
    k_idx = torch.arange(S, device=key_mask.device)[None, :]  # [1, S]
    allowed = k_idx <= q_idx  # [T, S]
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    mask = allowed[None] & key_mask[:, None, :]  # [B, T, S]
    mask = mask | (k_idx == q_idx)[None]
    return mask[:, None]  # [B, 1, T, S]


def positions_from_mask(key_mask: torch.Tensor, start: int) -> torch.Tensor:
    """Positions [B, T] of slots start..S-1: real tokens before each (HF: cumsum - 1); padding -> 0."""
    pos = key_mask.long().cumsum(-1) - 1  # [B, S]
    return pos.masked_fill(~key_mask, 0)[:, start:]


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                      softcap: float | None = None) -> torch.Tensor:
    """Attention of q [b, Hkv, g * T, Dh] (the query heads sharing a kv head folded into the query length) over
    k, v [b, Hkv, S, Dh] under mask [b, 1, g * T, S] (True = attend): SDPA, or, with softcap (Gemma 2), its scores
    cap * tanh(q k^T * scale / cap) written out (SDPA has no soft-capping), softmax in fp32 -> [b, Hkv, g * T, Dh]."""
    if softcap is None:
        with sdpa_kernel(list(SDPA_BACKENDS)):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # in two halves of the queries: a half's scores in q's dtype and its fp32 probabilities fit the fp32 scores of
    # all queries that tiermem.placement.workspace_bytes reserves
    rows = max(1, math.ceil(q.shape[2] / 2))
    outs = []
    for start in range(0, q.shape[2], rows):
        part = mask[:, :, start:start + rows] if mask.shape[2] > 1 else mask
        scores = torch.matmul(q[:, :, start:start + rows], k.transpose(-1, -2))  # [b, Hkv, rows, S]
        ops.softcap_(scores.mul_(scale), softcap).masked_fill_(~part, float("-inf"))
        outs.append(torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v))
    return torch.cat(outs, dim=2)


# cuDNN attention builds a new plan (~2 ms of host time) whenever the key length changes, i.e. on every
# decode step of every layer; the other backends launch in microseconds.
SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


@dataclass
class Attention:
    """One micro-batch's view of a step: rows of the batch, key mask, cache, RoPE tables."""

    key_mask: torch.Tensor  # bool [b, S]: real tokens among all keys (past + new)
    start: int  # slots already in the cache before this step
    rows: slice  # this micro-batch's rows of the full batch (and of the cache)
    cache: KVCache | None = None
    cos: torch.Tensor | None = None  # [b, T, R]: R of Dh dimensions rotate (rope.cos_sin)
    sin: torch.Tensor | None = None
    cos_local: torch.Tensor | None = None  # Gemma 3's sliding-window layers' own tables (None: cos, sin)
    sin_local: torch.Tensor | None = None
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _grouped: dict[tuple[int | None, int], torch.Tensor] = field(default_factory=dict)

    def rope(self, x: torch.Tensor, local: bool = False) -> torch.Tensor:
        """Rotary embedding of x [b, H, T, Dh] at this step's positions (local: with the sliding-window layers'
        tables, where the model has them)."""
        if local and self.cos_local is not None:
            return ops.apply_rope(x, self.cos_local, self.sin_local)
        return ops.apply_rope(x, self.cos, self.sin)

    def mask(self, window: int | None) -> torch.Tensor:
        """causal_mask [b, 1, T, S] of this step."""
        if window not in self._masks:
            self._masks[window] = causal_mask(self.key_mask, self.start, window)
        return self._masks[window]

    def grouped_mask(self, window: int | None, group: int) -> torch.Tensor:
        """The mask for queries folded by kv head: [b, 1, group * T, S], query j * T + t being token t of the
        j-th query head sharing a kv head (a view [b, 1, 1, S] for a decode step)."""
        mask = self.mask(window)
        b, _, T, S = mask.shape
        if group == 1 or T == 1:
            return mask
        if (window, group) not in self._grouped:
            self._grouped[(window, group)] = mask.expand(b, group, T, S).reshape(b, 1, group * T, S)
        return self._grouped[(window, group)]

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
        scale: float | None = None, softcap: float | None = None,
    ) -> torch.Tensor:
        """q [b, H, T, Dh], new k/v [b, Hkv, T, Dh] -> attention output [b, T, H * Dh]; scale: of the scores (None:
        Dh ** -0.5); softcap: Gemma 2's cap of the scores (grouped_attention).

        A decode step (T = 1) over a quantized cache on the GPU can read K and V quantized, dequantizing them
        inside the attention kernel (ops.kv_decode_attention, while ops.FUSED_KV_ATTENTION); otherwise K and V
        come dequantized and the query heads sharing a kv head are folded into the query length, so that SDPA
        never repeats K and V per query head (tests/test_attention_memory.py).
        """
        b, H, T, Dh = q.shape
        scale = Dh**-0.5 if scale is None else scale
        on_host = self.cache is not None and self.cache.cpu_attention
        if on_host and (T == 1 or self.cache.length):  # decode steps: attention over the host K/V, on the host
            out = self.cache.attend(layer, self.rows, q, k, v, self.mask(window), scale, softcap)  # [b, H, T, Dh]
            return out.transpose(1, 2).reshape(b, T, H * Dh)
        scheme = self.cache.kv_quant if self.cache is not None else None
        length = self.cache.length + T if self.cache is not None else 0
        if (ops.FUSED_KV_ATTENTION and scheme is not None and T == 1 and softcap is None
                and ops.kv_decode_attention_supported(q, k.shape[1], scheme.bits, scheme.group_size, length)):
            keys, values = self.cache.append(layer, self.rows, k, v)  # QuantizedKV [b, Hkv, S_max, *]
            out = ops.kv_decode_attention(q, keys.tensors, values.tensors, scheme.bits, scheme.group_size,
                                          self.key_mask, length, window, scale)  # [b, H, 1, Dh]
            return out.transpose(1, 2).reshape(b, T, H * Dh)
        if on_host:  # a prompt into an empty host cache: its K/V go to the host, its attention runs here
            k, v = self.cache.store(layer, self.rows, k, v)
        elif self.cache is not None:
            k, v = self.cache.update(layer, self.rows, k, v)  # [b, Hkv, S, Dh]
        kv_heads = k.shape[1]
        group = H // kv_heads
        out = grouped_attention(q.reshape(b, kv_heads, group * T, Dh), k, v, self.grouped_mask(window, group), scale,
                                softcap)  # [b, Hkv, group * T, Dh]
        return out.reshape(b, H, T, Dh).transpose(1, 2).reshape(b, T, H * Dh)

"""GPU memory of one decode attention over a GQA cache: no copy of K and V per query head.

SDPA with enable_gqa and a mask falls back to its math backend, which repeats K and V for every query head:
in the 111B (b) run (96 heads over 8 kv heads, batch 64, 518 slots) that was 1.6 GB per layer beyond the
workspace estimate, and the peak went past gpu_memory. engine.attention folds the query heads that share a
kv head into the query length instead.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tiermem.engine.attention import Attention
from tiermem.engine.kv_cache import KVCache
from tiermem.kernels import ops
from tiermem.kernels.quant import QuantScheme

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("kv_quant", [None, QuantScheme(4, 64)])
def test_decode_attention_does_not_repeat_kv_per_query_head(kv_quant, monkeypatch):
    monkeypatch.setattr(ops, "FUSED_KV_ATTENTION", False)  # the dequantize + SDPA path
    b, heads, kv_heads, dh, length = 64, 16, 2, 64, 2047
    shape = SimpleNamespace(num_layers=1, num_kv_heads=kv_heads, head_dim=dh)
    cache = KVCache.allocate(shape, b, length + 1, torch.bfloat16, "cuda", kv_quant)
    gen = torch.Generator(device="cuda").manual_seed(0)
    past = torch.randn(b, kv_heads, length, dh, device="cuda", generator=gen, dtype=torch.bfloat16)
    cache.begin_step(torch.ones(b, length, dtype=torch.bool, device="cuda"))
    cache.update(0, slice(0, b), past, past)
    cache.end_step(length)
    del past
    key_mask = cache.begin_step(torch.ones(b, 1, dtype=torch.bool, device="cuda"))
    attn = Attention(key_mask, length, slice(0, b), cache)
    q = torch.randn(b, heads, 1, dh, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(b, kv_heads, 1, dh, device="cuda", generator=gen, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = attn(0, q, k, k)
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - base
    dense_kv = 2 * b * kv_heads * (length + 1) * dh * 2  # K and V of the layer in bf16
    dequantized = dense_kv if kv_quant is not None else 0
    # Allowed: K and V dequantized, an fp32 copy of them (SDPA's math backend upcasts), fp32 scores and their
    # softmax, the output. A repeat per query head would add (heads / kv_heads) x dense_kv = 537 MB here.
    budget = dequantized + 2 * dense_kv + 4 * b * heads * (length + 1) * 4 + out.numel() * 2 + (8 << 20)
    assert out.shape == (b, 1, heads * dh)
    assert transient <= budget, f"decode attention took {transient / 2**20:.0f} MiB, expected <= {budget / 2**20:.0f}"

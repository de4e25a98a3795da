"""Batched generation: prefill, then one token per step with the KV cache; greedy or sampled.

Semantics follow transformers' `generate`: left padding + attention_mask, positions counted over
real tokens, temperature -> top-k -> top-p, and after a row emits EOS it emits `pad_token_id`;
generation stops early (fewer than max_new_tokens columns) once every row has finished.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tiermem.engine.executor import Executor
from tiermem.engine.kv_cache import KVCache
from tiermem.errors import ConfigError


def process_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """logits [B, V] (fp32) -> logits with temperature applied and tokens outside top-k / top-p at -inf."""
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)  # [B, V]
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= 1 - top_p
        remove[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def next_tokens(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax, or a draw from the processed distribution."""
    logits = logits.to(torch.float32)
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = process_logits(logits, temperature, top_k, top_p).softmax(dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _eos_set(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


@torch.no_grad()
def generate(
    executor: Executor, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
    generator: torch.Generator | None = None, micro_batches: int = 1, cache: KVCache | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """input_ids [B, T] (left-padded) -> LongTensor [B, T + n], n <= max_new_tokens (early stop on EOS).

    cache: an empty KVCache of batch B and max_len >= T + max_new_tokens (default: allocated here).
    on_step(k) is called after the k-th new token (k = 1 .. n) has been chosen (progress, timing).
    """
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    eos = _eos_set(eos_token_id)
    if eos and pad_token_id is None:
        pad_token_id = eos[0]
    B, T = input_ids.shape
    device = executor.device
    out = input_ids.to(device=device, dtype=torch.long)
    if max_new_tokens == 0:
        return out
    mask = torch.ones_like(out) if attention_mask is None else attention_mask.to(device)
    if cache is None:
        cache = KVCache.allocate(executor.cfg, B, T + max_new_tokens, executor.dtype, device)
    elif cache.batch != B or cache.max_len < T + max_new_tokens or cache.length:
        raise ConfigError(f"the KV cache (batch {cache.batch}, max_len {cache.max_len}, {cache.length} used) "
                          f"cannot hold batch {B} x {T + max_new_tokens} tokens: pass an empty, larger cache")
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    step_ids, step_mask = out, mask
    for k in range(1, max_new_tokens + 1):
        logits = executor.forward(step_ids, step_mask, cache, micro_batches=micro_batches, last_only=True)
        token = next_tokens(logits[:, -1], do_sample, temperature, top_k, top_p, generator)  # [B]
        if eos:
            token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
            unfinished = unfinished & ~torch.isin(token, eos_ids)
        out = torch.cat([out, token[:, None]], dim=1)
        if on_step is not None:
            on_step(k)
        if eos and not bool(unfinished.any()):
            break
        step_ids, step_mask = token[:, None], torch.ones_like(token[:, None])
    return out

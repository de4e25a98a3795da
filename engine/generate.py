"""Batched generation: prefill, then one token per step with the KV cache; greedy or sampled.

Semantics follow transformers' `generate`: left padding + attention_mask, positions counted over
real tokens, temperature -> top-k -> top-p, and after a row emits EOS it emits `pad_token_id`;
generation stops early (fewer than max_new_tokens columns) once every row has finished.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tiermem.config import check_integer
from tiermem.engine.config import ModelConfig
from tiermem.engine.executor import Executor
from tiermem.engine.kv_cache import KVCache
from tiermem.engine.static_decode import StaticDecoder
from tiermem.errors import ConfigError


def process_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """logits [B, V] (fp32) -> logits with temperature applied and tokens outside top-k / top-p at -inf."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a finite number > 0 when sampling, got {temperature}; "
                          "use do_sample=False for greedy decoding")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0: no top-k filter), got {top_k}")
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
    ids = [eos_token_id] if isinstance(eos_token_id, (numbers.Integral, str)) else eos_token_id
    for eos_id in ids:
        check_integer("eos_token_id", eos_id)
    return [int(e) for e in ids]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen and when a row stops.

    eos_token_id: the ids that finish a row (empty: rows never finish); pad_token_id: what a finished
    row emits after that (`Sampling.make` resolves None to the first EOS id, as transformers does).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @classmethod
    def make(cls, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> Sampling:
        """Normalized settings: eos as a tuple of ints, pad defaulting to the first EOS id.

        ConfigError for a value of the wrong type (a float top_k, a string do_sample), which a cast would hide.
        """
        if not isinstance(do_sample, bool):
            raise ConfigError(f"do_sample must be bool (True or False), got {do_sample!r}")
        check_integer("top_k", top_k)
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        if pad_token_id is not None:
            check_integer("pad_token_id", pad_token_id)
        eos = tuple(_eos_set(eos_token_id))
        if eos and pad_token_id is None:
            pad_token_id = eos[0]
        return cls(bool(do_sample), float(temperature), int(top_k), float(top_p), eos,
                   None if pad_token_id is None else int(pad_token_id))

    def check(self) -> None:
        """ConfigError for settings that cannot sample (checked before any state changes)."""
        if self.do_sample:
            process_logits(torch.zeros(1, 2), self.temperature, self.top_k, self.top_p)


@dataclass
class DecodeState:
    """Where a generation stands: everything the decode loop needs to take the next step.

    tokens[:, cache.length:] are the tokens not yet run through the model: the whole prompt before
    the first step, afterwards the last token chosen. mask marks real tokens (False = left padding);
    the cache's key_mask holds mask[:, :cache.length].
    """

    tokens: torch.Tensor  # long [B, T + n]: prompt, then the n tokens chosen so far
    mask: torch.Tensor  # bool [B, T + n]
    cache: KVCache
    unfinished: torch.Tensor  # bool [B]: the row has not emitted EOS yet
    generator: torch.Generator | None = None
    new_tokens: int = 0  # n

    @classmethod
    def start(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache,
              generator: torch.Generator | None = None) -> DecodeState:
        """The state before the first step: input_ids [B, T] (left-padded) and an empty cache."""
        device = cache.key_mask.device
        tokens = input_ids.to(device=device, dtype=torch.long)
        B, T = tokens.shape
        if cache.length or cache.batch != B:
            raise ConfigError(f"the KV cache (batch {cache.batch}, {cache.length} used) cannot start a "
                              f"generation of batch {B}: pass an empty cache of that batch")
        if attention_mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=device)
        elif tuple(attention_mask.shape) != (B, T):
            raise ConfigError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match "
                              f"input_ids [{B}, {T}]")
        else:
            mask = attention_mask.to(device=device, dtype=torch.bool)
        return cls(tokens, mask, cache, torch.ones(B, dtype=torch.bool, device=device), generator)

    def to(self, device: torch.device | str) -> None:
        """Move the tensors (not the generator) to `device`, in place."""
        self.tokens, self.mask = self.tokens.to(device), self.mask.to(device)
        self.unfinished = self.unfinished.to(device)
        self.cache = self.cache.to(device)


def _reruns_the_sequence(cfg: ModelConfig, past: int, length: int) -> bool:
    """LongRoPE (Phi-3): the step that first takes the sequence past the original length runs it all again, so that
    every cached key is rotated with the long frequencies, as transformers' Phi-3 generate does (it drops its
    cache there); the other steps rotate only their new keys."""
    rope = cfg.rope
    if rope is None or rope.type != "longrope":
        return False
    return 0 < past <= rope.original_max_position_embeddings < length


@torch.no_grad()
def decode(
    executor: Executor, state: DecodeState, sampling: Sampling, max_new_tokens: int, micro_batches: int = 1,
    on_step: Callable[[int], None] | None = None, prefill_micro_batches: int | None = None,
    step_decoder: StaticDecoder | None = None,
) -> int:
    """Choose up to `max_new_tokens` more tokens, advancing `state` in place; returns how many were chosen.

    Stops early once every row has finished (with EOS ids set). The cache needs room for
    tokens.shape[1] + max_new_tokens - 1 slots. A step that fails leaves the state as it was before
    that step (the cache length is rolled back; the generator may have advanced if sampling ran).
    on_step(k) is called after the k-th token of this call (k = 1 .. n) has been chosen. A step over
    more than one new token (the prompt) splits the batch into prefill_micro_batches (default:
    micro_batches), a one-token step into micro_batches. step_decoder (over state.cache): what runs the
    one-token steps of a whole batch instead of the executor (CUDA graph replays).
    """
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens:
        sampling.check()
    eos = sampling.eos_token_id
    eos_ids = torch.tensor(eos, dtype=torch.long, device=state.tokens.device)
    cache = state.cache
    for k in range(1, max_new_tokens + 1):
        if eos and not bool(state.unfinished.any()):
            return k - 1
        past = rollback = cache.length
        if _reruns_the_sequence(executor.cfg, past, state.tokens.shape[1]):
            past = cache.length = 0
        split = prefill_micro_batches if prefill_micro_batches and state.tokens.shape[1] - past > 1 else micro_batches
        try:
            if step_decoder is not None and split == 1 and state.tokens.shape[1] - past == 1:
                logits = step_decoder.forward(state.tokens[:, past:], state.mask[:, past:])
            else:
                logits = executor.forward(state.tokens[:, past:], state.mask[:, past:], cache,
                                          micro_batches=split, last_only=True)
            token = next_tokens(logits[:, -1], sampling.do_sample, sampling.temperature, sampling.top_k,
                                sampling.top_p, state.generator)  # [B]
        except BaseException:
            cache.length = rollback
            raise
        unfinished = state.unfinished
        if eos:
            token = torch.where(unfinished, token, torch.full_like(token, sampling.pad_token_id))
            unfinished = unfinished & ~torch.isin(token, eos_ids)
        state.tokens = torch.cat([state.tokens, token[:, None]], dim=1)
        state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
        state.unfinished = unfinished
        state.new_tokens += 1
        if on_step is not None:
            on_step(k)
    return max_new_tokens


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
    B, T = input_ids.shape
    if max_new_tokens == 0:
        return input_ids.to(device=executor.device, dtype=torch.long)
    if cache is None:
        cache = KVCache.allocate(executor.cfg, B, T + max_new_tokens, executor.dtype, executor.device)
    elif cache.batch != B or cache.max_len < T + max_new_tokens or cache.length:
        raise ConfigError(f"the KV cache (batch {cache.batch}, max_len {cache.max_len}, {cache.length} used) "
                          f"cannot hold batch {B} x {T + max_new_tokens} tokens: pass an empty, larger cache")
    state = DecodeState.start(input_ids, attention_mask, cache, generator)
    sampling = Sampling.make(do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id)
    decode(executor, state, sampling, max_new_tokens, micro_batches, on_step)
    return state.tokens

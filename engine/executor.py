"""Runs a model's blocks over a batch: layer-outer, micro-batch-inner (FlexGen's schedule).

Each block is taken from the WeightSource once per forward step and applied to every micro-batch
before the next block is requested, so a streamed block crosses the slow link once per step
however many micro-batches there are.
"""

from __future__ import annotations

import torch

from tiermem.engine import rope
from tiermem.engine.attention import Attention, positions_from_mask
from tiermem.engine.config import ModelConfig, family_module
from tiermem.engine.kv_cache import KVCache
from tiermem.engine.weights import WeightSource
from tiermem.errors import ConfigError, WeightsError


def micro_batch_slices(batch: int, micro_batches: int) -> list[slice]:
    """Split rows 0..batch-1 into min(micro_batches, batch) contiguous, near-equal slices."""
    if micro_batches < 1:
        raise ConfigError(f"micro_batches must be >= 1, got {micro_batches}")
    n = min(micro_batches, batch)
    size, extra = divmod(batch, n)
    bounds = [0]
    for k in range(n):
        bounds.append(bounds[-1] + size + (k < extra))
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def indexed_device(device: torch.device) -> torch.device:
    """`device` with its index: torch.device("cuda") is the current CUDA device, where tensors say cuda:N."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Executor:
    """Forward passes of `cfg`'s model with weights from `source`, computing on `device` in `dtype`.

    head_has_lm_head: the "head" block carries lm_head.weight even though the model ties it to the
    embedding (tiermem.pack does this so that the head never needs the embedding table on the GPU).
    """

    def __init__(
        self, cfg: ModelConfig, source: WeightSource, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32, head_has_lm_head: bool = False,
    ):
        self.cfg = cfg
        self.source = source
        self.device = torch.device(device)
        self.dtype = dtype
        self.family = family_module(cfg)
        self.inv_freq = rope.inverse_frequencies(cfg.rope, cfg.head_dim, self.device) if cfg.rope else None
        longrope = cfg.rope is not None and cfg.rope.type == "longrope"
        self.inv_freq_long = rope.inverse_frequencies(cfg.rope, cfg.head_dim, self.device, long=True) if longrope \
            else None
        self.inv_freq_local = (rope.inverse_frequencies(cfg.rope_local, cfg.head_dim, self.device)
                               if cfg.rope_local else None)  # Gemma 3's sliding-window layers
        lm_block, _ = self.family.lm_head_weight_name(cfg)
        # Tied embeddings: unless the store put a copy of lm_head.weight into "head" (head_has_lm_head),
        # the embedding block is streamed again after "head" for the output projection.
        tied_reuse = lm_block == "embed" and not head_has_lm_head
        self.block_order = cfg.block_names + (["embed"] if tied_reuse else [])

    def rope_tables(self, positions: torch.Tensor, local: bool = False
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos, sin [B, T, R] (rope.cos_sin) in the compute dtype for positions [B, T]; (None, None) for learned
        positions, and for local=True where the model has no second RoPE for its sliding-window layers."""
        if local:
            if self.inv_freq_local is None:
                return None, None
            return rope.cos_sin(self.inv_freq_local, positions, self.dtype, self.cfg.rope_local.attention_factor)
        if self.cfg.rope is None:
            return None, None
        inv_freq = self.inv_freq
        if self.cfg.rope.type == "dynamic":  # from the step's longest row, on the device (graph replays too)
            inv_freq = rope.dynamic_frequencies(self.cfg.rope, self.cfg.head_dim, positions.max() + 1)
        elif self.inv_freq_long is not None:  # longrope: the long set once the step's longest row passes the original
            # length (transformers' rule: a whole step, all rows, from max(position) + 1); chosen on the device, so
            # that a graph replay chooses too
            longer = positions.max() + 1 > self.cfg.rope.original_max_position_embeddings
            inv_freq = torch.where(longer, self.inv_freq_long, self.inv_freq)
        return rope.cos_sin(inv_freq, positions, self.dtype, self.cfg.rope.attention_factor)

    def _new_mask(self, attention_mask: torch.Tensor | None, B: int, T: int, past: int) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(B, T, dtype=torch.bool, device=self.device)
        if attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, past + T):
            raise ConfigError(f"attention_mask of shape {tuple(attention_mask.shape)} does not fit input "
                              f"[{B}, {T}] after {past} cached tokens: pass [B, T] or [B, {past} + T]")
        return attention_mask[:, -T:].to(device=self.device, dtype=torch.bool)

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None, micro_batches: int = 1, last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only) in the compute dtype.

        attention_mask [B, T] (or [B, past + T] as HF passes it; 0 = left padding) marks real
        tokens; positions count real tokens as HF's generate does. With a cache, the new keys and
        values are appended to it and attention covers the cached tokens too.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        input_ids = input_ids.to(self.device)
        past = cache.length if cache is not None else 0
        new_mask = self._new_mask(attention_mask, B, T, past)
        key_mask = cache.begin_step(new_mask) if cache is not None else new_mask  # [B, past + T]
        positions = positions_from_mask(key_mask, past)  # [B, T]
        if cfg.rope is None and int(positions.max()) >= cfg.max_position_embeddings:
            raise ConfigError(f"{cfg.model_type} has learned positions up to {cfg.max_position_embeddings}; "
                              f"position {int(positions.max())} requested: shorten the sequence")
        tables = [*self.rope_tables(positions), *self.rope_tables(positions, local=True)]  # cos, sin, local ones
        slices = micro_batch_slices(B, micro_batches)
        attns = [Attention(key_mask[r], past, r, cache, *(t[r] if t is not None else None for t in tables))
                 for r in slices]
        hs: list[torch.Tensor] = []  # per micro-batch hidden states [b, T, D]
        with self.source.stream(self.block_order) as blocks:
            for step, (name, w) in enumerate(blocks):
                if name != self.block_order[step]:
                    raise WeightsError(f"weight source yielded block {name!r}, "
                                       f"expected {self.block_order[step]!r}")
                hs = self._run_block(step, name, w, hs, input_ids, positions, slices, attns, last_only)
        if cache is not None:
            cache.end_step(T)
        return torch.cat(hs, dim=0)

    def _run_block(
        self, step, name, w, hs, input_ids, positions, slices, attns, last_only
    ) -> list[torch.Tensor]:
        """Apply block `name` (the step-th of block_order) to every micro-batch."""
        cfg, fam = self.cfg, self.family
        if step == 0:
            return [fam.embed(cfg, w, input_ids[r], positions[r], self.device, self.dtype) for r in slices]
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            return [fam.layer(cfg, i, w, h, a) for h, a in zip(hs, attns, strict=True)]
        if name == "head":
            hs = [fam.final(cfg, w, h[:, -1:] if last_only else h) for h in hs]
            if step == len(self.block_order) - 1:
                return [fam.logits(cfg, w, h) for h in hs]
            return hs
        return [fam.logits(cfg, w, h) for h in hs]  # tied: the embedding block streamed again

"""Decode steps of fixed shape, so that a step can be captured once as a CUDA graph and replayed.

With every block in HBM and the KV cache on the GPU, a decode step (one token per row) launches
the same ~20 kernels per layer every step; issuing them from Python took 19-45 ms per step for
llama3-8b int4 at batch 16 on an H200 machine, where the GPU computed for about 9 ms
(benchmarks/results/llama3_8b_int4_b16x2048_*_profile_*.json, *_kv_gpu_s9call4_*). Only a few values
change from step to step: the new token's slot, the rows' positions and which keys are real. Here
they live in device tensors that the step reads (`slot` [1], `positions` [B, 1], the cache's key
mask), the new K and V go into the cache at `slot` (index_copy_; for an int8/int4 cache one launch quantizes
them straight into it, reading `slot` too, and the fused attention kernel reads the cache over the span, told
the query's slot by `slot`), and attention covers a fixed span of slots (the filled ones rounded up to `bucket`;
keys past the new slot are masked out), so that the launches of a step and their arguments are the same for every
step within a span.

StaticDecoder.forward is a decode step of Executor.forward over a KVCache. On the CPU it runs the step
as it is (what tests compare with Executor.forward). With `graphs=True` (CUDA) the first step of
each span runs as it is and is captured; later steps of that span replay the capture. The step's token ids
are a device tensor too, and the graph gathers their embedding on the GPU, from HBM or, for an embedding kept in
pinned host memory, from that memory mapped into the GPU's address space (only the B rows cross PCIe, and for
OPT's narrower embeddings the small project_in weight of that block): the host
never waits for a step's token (before, it copied each token to the host, gathered its row there and copied it
back, 0.7-1.1 ms of every step's host part on the H200 machine). The sampling stays outside the graph, on the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from tiermem.engine.attention import grouped_attention, positions_from_mask
from tiermem.engine.executor import Executor, indexed_device
from tiermem.engine.kv_cache import KVCache, QuantizedKV, Stored
from tiermem.errors import ConfigError, NotResidentError
from tiermem.kernels import ops

DEFAULT_BUCKET = 256  # slots: attention reads up to this many more than filled, a graph serves this many steps


def span_of(length: int, bucket: int = DEFAULT_BUCKET) -> int:
    """Slots attention covers for a step that fills slot `length`: length + 1 rounded up to the bucket."""
    return math.ceil((length + 1) / bucket) * bucket


def _first_tensor(cache: KVCache) -> torch.Tensor:
    """Layer 0's K (its codes when quantized): what changes when the cache is grown or moved."""
    first = cache.keys[0]
    return first.codes if isinstance(first, QuantizedKV) else first


def check_resident(executor: Executor) -> None:
    """NotResidentError unless every block of `executor`'s model after the embedding stays in HBM (the embedding, of
    which a step reads B rows, may stay in pinned host memory; a tied output projection that reuses it may not): a
    CUDA graph replays a step's kernels, not the copies of streamed blocks."""
    weights = getattr(executor.source, "weights", None)
    first, *graphed = executor.block_order
    streamed = [n for n in graphed if weights is None or n not in weights.resident]
    streamed += [first] if weights is None or (first not in weights.resident and first not in weights.host_only) else []
    if streamed:
        raise NotResidentError(f"CUDA graphs need every block resident in HBM; {len(streamed)} blocks of this "
                               "placement are streamed: raise gpu_memory, or leave cuda_graphs out")
    if weights.device_views(first) is None:
        raise NotResidentError(f"CUDA graphs gather the token embedding on the GPU, and this GPU cannot map the "
                               f"pinned host memory of block {first!r}: leave cuda_graphs out")


@dataclass
class StaticAttention:
    """Attention of a decode step at the slot held in `slot`, over slots 0..span-1 of `cache` (all rows)."""

    cache: KVCache
    slot: torch.Tensor  # long [1] on the device: where the new token's K and V go
    span: int
    cos: torch.Tensor | None  # [B, 1, R] (rope.cos_sin)
    sin: torch.Tensor | None
    cos_local: torch.Tensor | None = None  # Gemma 3's sliding-window layers' own tables (None: cos, sin)
    sin_local: torch.Tensor | None = None
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def rope(self, x: torch.Tensor, local: bool = False) -> torch.Tensor:
        """Rotary embedding of x [B, H, 1, Dh] at the step's positions (local: as engine.attention.Attention.rope)."""
        if local and self.cos_local is not None:
            return ops.apply_rope(x, self.cos_local, self.sin_local)
        return ops.apply_rope(x, self.cos, self.sin)

    def mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, 1, span] (True = attend): real keys up to the new slot (within `window`), and the new slot."""
        if window not in self._masks:
            k_idx = torch.arange(self.span, device=self.slot.device)  # [span]
            allowed = (k_idx <= self.slot) & self.cache.key_mask[:, :self.span]  # [B, span]
            if window is not None:
                allowed = allowed & (k_idx > self.slot - window)
            self._masks[window] = (allowed | (k_idx == self.slot))[:, None, None]
        return self._masks[window]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 window: int | None = None, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
        """q [B, H, 1, Dh], new k/v [B, Hkv, 1, Dh] -> attention output [B, 1, H * Dh] (scale, softcap: as
        engine.attention.Attention takes them).

        A quantized cache on the GPU is read by the fused kernel (ops.kv_decode_attention) over the span, told the
        query's slot by `slot`; otherwise (or while ops.FUSED_KV_ATTENTION is off) the span is dequantized for SDPA."""
        B, H, _, Dh = q.shape
        scale = Dh**-0.5 if scale is None else scale
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        for stored, x in ((keys, k), (values, v)):
            self._write(stored, x)
        if isinstance(keys, QuantizedKV):
            scheme = keys.scheme
            if (ops.FUSED_KV_ATTENTION and softcap is None
                    and ops.kv_decode_attention_supported(q, k.shape[1], scheme.bits, scheme.group_size, self.span)):
                out = ops.kv_decode_attention(q, keys.tensors, values.tensors, scheme.bits, scheme.group_size,
                                              self.cache.key_mask, self.span, window, scale,
                                              query_slot=self.slot)  # [B, H, 1, Dh]
                return out.transpose(1, 2).reshape(B, 1, H * Dh)
            keys, values = keys.dequantize(slice(None), self.span), values.dequantize(slice(None), self.span)
        else:
            keys, values = keys[:, :, :self.span], values[:, :, :self.span]  # [B, Hkv, span, Dh]
        kv_heads = k.shape[1]
        out = grouped_attention(q.reshape(B, kv_heads, H // kv_heads, Dh), keys, values, self.mask(window), scale,
                                softcap)  # [B, Hkv, group, Dh]
        return out.reshape(B, 1, H * Dh)

    def _write(self, stored: Stored, x: torch.Tensor) -> None:
        """Put x [B, Hkv, 1, Dh] into slot `slot` of one layer's K or V (quantized first, as the dynamic step
        writes it, for a quantized cache)."""
        if isinstance(stored, QuantizedKV):
            stored.write(slice(None), self.slot, x)
        else:
            stored.index_copy_(2, self.slot, x)


class StaticDecoder:
    """Decode steps of `executor`'s model over `cache` (on the executor's device, every row at once)."""

    def __init__(self, executor: Executor, cache: KVCache, bucket: int = DEFAULT_BUCKET, graphs: bool = False):
        if type(cache) is not KVCache:
            raise ConfigError("static decode steps need a KVCache on the device (not offloaded to host RAM or disk)")
        if cache.key_mask.device != indexed_device(executor.device):
            raise ConfigError(f"the KV cache is on {cache.key_mask.device}, the model on {executor.device}")
        if bucket < 1:
            raise ConfigError(f"bucket must be >= 1, got {bucket}")
        if graphs and executor.device.type != "cuda":
            raise ConfigError("CUDA graphs need device='cuda'")
        if graphs:
            check_resident(executor)
        self.executor, self.cache, self.bucket, self.graphs = executor, cache, bucket, graphs
        B, device = cache.batch, executor.device
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.input_ids = torch.zeros(B, 1, dtype=torch.long, device=device)  # the step's tokens
        # check_resident made sure the GPU reads the embedding in place (GpuWeights.device_views, made once)
        self._embedding = executor.source.weights.device_views(executor.block_order[0]) if graphs else None
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._cache_ptr = _first_tensor(cache).data_ptr()
        self._pool = None

    def span(self, length: int) -> int:
        """span_of(length) within the cache's slots."""
        return min(self.cache.max_len, span_of(length, self.bucket))

    def graph(self, span: int) -> torch.cuda.CUDAGraph:
        """The CUDA graph of steps over `span` slots, captured at the first of them (KeyError before that step, and
        after the capture of another span, which replaces it)."""
        return self._captured[span][0]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step: input_ids [B, 1] after the cached tokens -> logits [B, 1, V] (Executor.forward)."""
        ex, cache = self.executor, self.cache
        if input_ids.shape != (cache.batch, 1):
            raise ConfigError(f"a static decode step takes input_ids [{cache.batch}, 1], got {tuple(input_ids.shape)}")
        if _first_tensor(cache).data_ptr() != self._cache_ptr:
            raise ConfigError("the KV cache's tensors changed (grown or moved) since this decoder was made")
        past = cache.length
        new_mask = ex._new_mask(attention_mask, cache.batch, 1, past)
        key_mask = cache.begin_step(new_mask)  # [B, past + 1]
        self.slot.fill_(past)
        self.positions.copy_(positions_from_mask(key_mask, past))  # each <= past: only a long cache reads them back
        if (ex.cfg.rope is None and past >= ex.cfg.max_position_embeddings
                and int(self.positions.max()) >= ex.cfg.max_position_embeddings):
            raise ConfigError(f"{ex.cfg.model_type} has learned positions up to {ex.cfg.max_position_embeddings}; "
                              f"position {int(self.positions.max())} requested: shorten the sequence")
        self.input_ids.copy_(input_ids)
        span = self.span(past)
        if span in self._captured:
            graph, logits = self._captured[span]
            graph.replay()
        else:
            logits = self._step(span)
            if self.graphs:  # one graph at a time: a generation's spans only grow (the next one may start shorter)
                self._captured = {span: self._capture(span)}
        cache.end_step(1)
        return logits

    @contextmanager
    def _embedding_block(self) -> Iterator[dict]:
        """The embedding block's tensors: on the device for graphs, else where the source keeps them."""
        if self._embedding is not None:
            yield self._embedding
            return
        with self.executor.source.stream(self.executor.block_order[:1]) as blocks:
            (_, w), = blocks
            yield w

    def _step(self, span: int) -> torch.Tensor:
        """The whole step from the static inputs -> logits [B, 1, V]."""
        ex = self.executor
        with self._embedding_block() as w:
            h = ex.family.embed(ex.cfg, w, self.input_ids, self.positions, ex.device, ex.dtype)  # [B, 1, D]
        attn = StaticAttention(self.cache, self.slot, span, *ex.rope_tables(self.positions),
                               *ex.rope_tables(self.positions, local=True))
        with ex.source.stream(ex.block_order[1:]) as blocks:
            for name, w in blocks:
                if name.startswith("layers."):
                    h = ex.family.layer(ex.cfg, int(name.split(".")[1]), w, h, attn)
                elif name == "head":
                    h = ex.family.final(ex.cfg, w, h)
                    if ex.block_order[-1] == "head":
                        h = ex.family.logits(ex.cfg, w, h)
                else:
                    h = ex.family.logits(ex.cfg, w, h)  # tied: the embedding block again
        return h

    def _capture(self, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """A CUDA graph of _step(span) and the logits tensor its replays write (capturing runs nothing: the step
        was just run as it is, which also warmed up every kernel the graph records)."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: the I/O threads of other tiers (or of the caller) may use CUDA meanwhile; this thread may not
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._step(span)
        self._pool = graph.pool()
        return graph, logits

"""The public entry points: pack a checkpoint, load a store, run it (forward / generate)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tiermem.config import PrefetchConfig, check_integer, format_size, parse_size
from tiermem.engine.config import (
    ModelConfig,
    check_weights,
    gpu_compute_dtype,
    model_config_from_hf,
    tied_head_alias,
)
from tiermem.engine.executor import Executor
from tiermem.engine.families import output
from tiermem.engine.generate import DecodeState, Sampling, decode
from tiermem.engine.kv_cache import KVCache
from tiermem.engine.static_decode import StaticDecoder, check_resident
from tiermem.errors import BudgetError, ConfigError, NotResidentError, PackError, StoreError, TiermemError
from tiermem.kernels.kv_quant import auto_kv_schemes, kv_scheme
from tiermem.kernels.quant import QuantScheme
from tiermem.kv_disk import DiskKVCache
from tiermem.kv_offload import HostKVCache
from tiermem.pinned import ArenaPool
from tiermem.placement import build_cpu_source, build_gpu_source, graph_options_allowed, kv_cache_bytes
from tiermem.planner import Plan
from tiermem.scratch_file import check_offload_dir
from tiermem.session import GenerationSession
from tiermem.storage.format import StoreReader
from tiermem.storage.hf import HFCheckpoint
from tiermem.storage.pack import pack_checkpoint


def pack(
    src_hf_dir: str | os.PathLike, dst_store: str | os.PathLike, quant: str | None = None,
    group_size: int = 64, *, overwrite: bool = False, progress: bool = True, dtype: torch.dtype | str | None = None,
) -> Path:
    """Convert an HF checkpoint dir (config.json + safetensors, single or sharded) into a block store.

    Streams tensor by tensor (peak RAM about one block). quant: None, "int8" or "int4" (group-wise,
    asymmetric, along the input dimension, fp16 scale and zero per `group_size` inputs). The config
    and every weight name and shape are checked before anything is written. A tied output projection
    is stored in the "head" block too, so that the head never needs the embedding table on the GPU.
    """
    dtype = _dtype_of(dtype)
    ckpt = HFCheckpoint(src_hf_dir)
    cfg = model_config_from_hf(ckpt.config)
    check_weights(cfg, {n: (ckpt.tensor_shape(n), ckpt.tensor_dtype(n)) for n in ckpt.tensor_names})
    try:
        scheme = QuantScheme.from_name(quant, group_size)
    except ConfigError as exc:
        raise PackError(str(exc)) from exc
    aliases = {k: v for k, v in tied_head_alias(cfg).items() if k not in ckpt.tensor_names}
    return pack_checkpoint(src_hf_dir, dst_store, scheme, progress=progress, dtype=dtype,
                           overwrite=overwrite, aliases=aliases)


def load(
    store: str | os.PathLike, device: str = "cpu", gpu_memory: int | str | None = None,
    cpu_memory: int | str | None = None, offload_dir: str | os.PathLike | None = None, *,
    dtype: torch.dtype | str | None = None, max_batch_size: int = 1, max_seq_len: int | None = None,
    micro_batches: int | None = None, lookahead: int | None = None, io_threads: int = 4,
    resident_weights: int | str | None = None, read_backend: str = "auto", progress: bool = False,
    kv_quant: str | None = None, kv_group_size: int | None = None, plan: Plan | str | None = "auto",
    kv_placement: str | None = None, cpu_attention: bool | None = None, cuda_graphs: bool | str = "auto",
) -> Model:
    """Open a block store for execution on `device` ("cpu" or "cuda[:N]").

    gpu_memory / cpu_memory are hard limits on what tiermem allocates ("24GiB", bytes, or None = no limit;
    gpu_memory only with device "cuda"). On CPU, blocks that do not fit cpu_memory are re-read from the store
    every step. On CUDA, blocks live in HBM, in pinned host memory (streamed to the GPU every step) or on disk
    (read every step, staged in pinned memory, streamed), and the KV cache on the GPU, in pinned host memory or
    in a file in offload_dir; the KV cache is sized for max_batch_size sequences of max_seq_len tokens (default:
    the model's max positions, capped at 4096) and counts against the budget of the tier it lives in (on disk:
    two layers of pinned staging count against cpu_memory, two layers of buffers and half a layer for the layout
    change against gpu_memory, and the file needs that much free disk).

    plan (CUDA): "auto" (default) places blocks and KV by tiermem's planner: the fastest placement
    its cost model finds for these budgets, using this machine's bandwidths (probed once, ~10 s,
    then cached in ~/.cache/tiermem). A tiermem.planner.Plan (`tiermem plan --json`, Plan.from_dict)
    is followed as given; None takes the greedy placement (blocks in HBM in execution order as far
    as they fit, KV on the GPU). Every choice can be fixed: kv_placement ("gpu", "cpu" or "disk"),
    micro_batches (how many slices of a batch decode steps run through each block; the plan may
    split the prompt finer, which only changes memory), lookahead (streamed blocks in flight); the
    planner then optimises the rest. cpu_attention=True (with the KV cache on the CPU) computes
    attention on the host over the KV there, FlexGen's cpu_cache_compute: only activations cross PCIe;
    False rules it out; None (default) lets the planner choose it where its cost model finds it
    faster, for a dense KV cache only (a quantized one would be dequantized on the host every step).
    resident_weights caps the HBM bytes of resident weights and implies the greedy placement (0
    streams every block, as FlexGen's all-offloaded placement does).

    dtype: what the model computes in, a torch dtype or its name ("bfloat16"); default float32 on the
    CPU, on CUDA the checkpoint's fp16/bf16 (else bf16).

    read_backend picks how the GPU path reads blocks that stay on disk: "posix" (O_DIRECT preadv
    pool), "kvikio", or "auto" (the faster by a cached probe of this machine).
    offload_dir (CUDA): a directory (on a fast local disk) where the KV cache may live, in one scratch
    file per generation under a unique name, deleted when the generation (or session) ends; with it the
    planner may choose kv_placement="disk", and kv_placement="disk" needs it. Each layer's filled KV is
    read back while the layer before it computes, and dropped from the page cache once read. With
    plan="auto" the load times that tier in offload_dir first (a few seconds: up to 1 GiB written and read
    back, then deleted), where the whole cache would fit there.
    kv_quant: None (K and V in the compute dtype), "int8" or "int4": the KV cache stores K and V
    quantized per (row, kv head, token) along head_dim, group-wise asymmetric with fp16 scale and
    zero per kv_group_size values (None = one group per head, else a divisor of head_dim); decode
    steps on the GPU dequantize them inside the attention kernel, other steps before attention. The
    KV budget reservation counts the quantized footprint. "auto" (CUDA, plan="auto"): the planner plans with
    each of None, "int8" and "int4" and takes the most precise one unless a less precise one is predicted at
    least 5% faster (planner.choose_kv_quant); Model.info()["kv_quant"] says which. It times each one's decode
    step at load: a few seconds more.
    cuda_graphs: decode steps with every block in HBM and the KV cache on the GPU run as CUDA graphs,
    captured once per 256 slots of context and replayed (tiermem.engine.static_decode), so that the host does
    not issue each step's kernels one by one (llama3-8b int4, batch 16 x 2048 on an H200: 1.3-3.6x faster
    steady steps; the first step of each 256 runs as it is and is captured, 60-65 ms more). "auto" (the default)
    uses them where the placement allows (with plan="auto": where the planner, planning again for graph replays,
    predicts them no slower; with kv_quant="auto" and a KV precision other than the eager plan's, the rule that
    chooses among precisions: a less precise cache only 5% faster, planner.kv_precision_prefers); True requires
    them (a placement that streams blocks, offloads the KV cache or splits decode steps into micro-batches is then
    a ConfigError); False never. Model.info()["cuda_graphs"] says which.
    A generate() call with micro_batches > 1 runs its steps as they are.
    """
    return load_from_reader(StoreReader(store), device, parse_size(gpu_memory), parse_size(cpu_memory),
                            dtype=dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                            micro_batches=micro_batches, lookahead=lookahead, io_threads=io_threads,
                            resident_weights=parse_size(resident_weights), read_backend=read_backend,
                            progress=progress, kv_quant=kv_quant, kv_group_size=kv_group_size, plan=plan,
                            kv_placement=kv_placement, cpu_attention=cpu_attention, offload_dir=offload_dir,
                            cuda_graphs=cuda_graphs)


def load_from_reader(
    reader, device: str, gpu_memory: int | None, cpu_memory: int | None, *, dtype: torch.dtype | None,
    max_batch_size: int, max_seq_len: int | None, micro_batches: int | None = None, lookahead: int | None = None,
    io_threads: int = 4, resident_weights: int | None = None, progress: bool = False, read_backend: str = "auto",
    kv_quant: str | None = None, kv_group_size: int | None = None, plan: Plan | str | None = "auto",
    kv_placement: str | None = None, cpu_attention: bool | None = None,
    offload_dir: str | os.PathLike | None = None, cuda_graphs: bool | str = False,
) -> Model:
    """load() over anything that reads like a StoreReader (a store, or tiermem.synthetic's SyntheticStore)."""
    _check_load_options(max_batch_size, max_seq_len, lookahead, micro_batches, read_backend, plan)
    if not (cuda_graphs is True or cuda_graphs is False or cuda_graphs == "auto"):
        raise ConfigError(f"cuda_graphs must be True, False or 'auto', got {cuda_graphs!r}")
    graphs_required = cuda_graphs is True
    dtype = _dtype_of(dtype)
    _check_disk_kv(device, kv_placement, offload_dir)
    cfg = model_config_from_hf(reader.model_config)
    kv_q = auto_kv_schemes(cfg.head_dim, kv_group_size) if kv_quant == "auto" else kv_scheme(
        kv_quant, cfg.head_dim, kv_group_size)
    check_weights(cfg, {b: reader.tensor_specs(b) for b in reader.block_names})
    max_seq_len = max_seq_len or min(cfg.max_position_embeddings, 4096)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a device: use 'cpu' or 'cuda'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but CUDA is not available here: use device='cpu'")
        dtype = gpu_compute_dtype(cfg, dtype)
        if cuda_graphs is True:  # the plan keeps the KV cache on the GPU and runs decode steps on the whole batch
            _check_graph_options(kv_placement, cpu_attention, micro_batches)
            kv_placement, cpu_attention, micro_batches = "gpu", False, 1
        elif cuda_graphs == "auto" and not graph_options_allowed(kv_placement, cpu_attention, micro_batches):
            cuda_graphs = False
        source = build_gpu_source(reader, cfg, dev, dtype, gpu_memory, cpu_memory, max_batch_size, max_seq_len,
                                  micro_batches, lookahead, io_threads, resident_weights, progress, read_backend,
                                  kv_quant=kv_q, plan=plan, kv_placement=kv_placement, cpu_attention=cpu_attention,
                                  offload_dir=offload_dir, cuda_graphs=cuda_graphs)
        kv_q, cuda_graphs = source.kv_quant, source.cuda_graphs
    elif dev.type == "cpu":
        if cuda_graphs is True:
            raise ConfigError("cuda_graphs replays decode steps on a GPU: use device='cuda'")
        cuda_graphs = False
        if kv_quant == "auto":
            raise ConfigError("kv_quant='auto' lets the GPU path's planner choose the KV cache's precision; on the "
                              "CPU pass None, 'int8' or 'int4'")
        if gpu_memory is not None:
            raise ConfigError("gpu_memory is a budget of device='cuda'; on the CPU pass cpu_memory only")
        if not (plan is None or plan == "auto") or kv_placement not in (None, "cpu") or cpu_attention:
            raise ConfigError("plans and kv_placement place blocks and KV for the GPU path; on the CPU pass "
                              "cpu_memory instead")
        dtype = dtype or torch.float32
        prefetch = PrefetchConfig(lookahead=lookahead or 2, io_threads=io_threads)
        source = build_cpu_source(reader, cfg, dtype, cpu_memory, max_batch_size, max_seq_len, prefetch,
                                  kv_quant=kv_q)
    else:
        raise ConfigError(f"device {device!r} is not supported: use 'cpu' or 'cuda'")
    head_has_lm_head = output.LM_HEAD in reader.tensor_specs("head")
    executor = Executor(cfg, source, dev, dtype, head_has_lm_head=head_has_lm_head)
    if cuda_graphs:
        try:
            check_resident(executor)
        except NotResidentError:
            if graphs_required:
                source.close()
                raise
            cuda_graphs = False  # "auto": a block the placement left on the host (a tied head's embedding)
    return Model(cfg, executor, source, reader, max_batch_size, max_seq_len, kv_quant=kv_q, cuda_graphs=cuda_graphs)


def _check_graph_options(kv_placement: str | None, cpu_attention: bool | None, micro_batches: int | None) -> None:
    """ConfigError, before anything is loaded, for choices CUDA graphs cannot replay (graph_options_allowed)."""
    if not graph_options_allowed(kv_placement, cpu_attention, micro_batches):
        raise ConfigError("cuda_graphs replays whole-batch decode steps over a KV cache on the GPU: leave "
                          f"kv_placement ({kv_placement!r}), cpu_attention and micro_batches ({micro_batches!r}) out, "
                          "or cuda_graphs")


def _check_load_options(max_batch_size: int, max_seq_len: int | None, lookahead: int | None,
                        micro_batches: int | None, read_backend: str, plan) -> None:
    """ConfigError for options load() takes on any device, before anything is read or allocated."""
    from tiermem.read_backend import check_backend_name

    for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len), ("lookahead", lookahead)):
        if value is not None:
            check_integer(name, value)
    if max_batch_size < 1 or (max_seq_len is not None and max_seq_len < 1):
        raise ConfigError(f"max_batch_size and max_seq_len must be >= 1, got {max_batch_size} and {max_seq_len}")
    if lookahead is not None and lookahead < 1:
        raise ConfigError(f"lookahead must be >= 1 (None: the plan's choice), got {lookahead}")
    _check_micro_batches(micro_batches)
    check_backend_name(read_backend)
    if not (plan is None or plan == "auto" or isinstance(plan, Plan)):
        raise ConfigError(f"plan must be 'auto', a tiermem.planner.Plan or None, got {plan!r}")


def _dtype_of(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating dtype given as torch.float16 or as its name ("float16", "bfloat16", "float32")."""
    if dtype is None:
        return None
    value = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"dtype {dtype!r} is not a floating-point torch dtype: use e.g. torch.bfloat16 or "
                          "'float16'")
    return value


def _check_disk_kv(device: str, kv_placement: str | None, offload_dir: str | os.PathLike | None) -> None:
    """ConfigError for a disk KV tier asked for inconsistently, or where it does not exist (the CPU path)."""
    if kv_placement == "disk" and offload_dir is None:
        raise ConfigError("kv_placement='disk' keeps the KV cache in a file: pass offload_dir=DIR (a directory on "
                          "a fast local disk)")
    if offload_dir is not None and kv_placement not in (None, "disk"):
        raise ConfigError(f"offload_dir is where a disk KV cache keeps its file, but kv_placement={kv_placement!r} "
                          "keeps it elsewhere: pass kv_placement='disk' (or leave it out to let the planner choose), "
                          "or leave offload_dir out")
    if offload_dir is not None and not str(device).startswith("cuda"):
        raise ConfigError("the disk KV tier (offload_dir, kv_placement='disk') streams KV to a GPU: use "
                          "device='cuda', or on the CPU leave offload_dir out and pass cpu_memory")
    if offload_dir is not None:
        check_offload_dir(offload_dir)


class Model:
    """A loaded model: forward(), generate(), generate_text(); close() or use as a context manager."""

    def __init__(self, cfg: ModelConfig, executor: Executor, source, reader,
                 max_batch_size: int, max_seq_len: int, kv_quant: QuantScheme | None = None,
                 cuda_graphs: bool = False) -> None:
        self.config = cfg
        self.executor = executor
        self.source = source
        self.reader = reader
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.kv_quant = kv_quant  # scheme of the KV caches generate() allocates (None: dense)
        self.cuda_graphs = cuda_graphs  # decode steps as CUDA graph replays (engine.static_decode)
        self.kv_placement = getattr(source, "kv_placement", "cpu" if self.device.type == "cpu" else "gpu")
        self.micro_batches = getattr(source, "micro_batches", 1)  # decode steps' default split (the plan's)
        self.prefill_micro_batches = getattr(source, "prefill_micro_batches", self.micro_batches)  # the prompt's
        self.cpu_attention = getattr(source, "cpu_attention", False)  # offloaded KV: attention on the host too
        self.offload_dir = getattr(source, "offload_dir", None)  # where a disk KV cache keeps its file
        self._host_caches: weakref.WeakSet[HostKVCache] = weakref.WeakSet()  # offloaded (host, disk) KV caches
        self._kv_arenas = ArenaPool()  # their pinned memory, kept registered from one generation to the next
        self._graphs: StaticDecoder | None = None  # the last generation's graph replays and KV cache, see _graph_cache
        self._tokenizer = None
        self._closed = False

    @property
    def device(self) -> torch.device:
        return self.executor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.executor.dtype

    def _check_open(self) -> None:
        if self._closed:
            raise TiermemError("this model is closed; load the store again")

    def _check_fits(self, batch: int, tokens: int) -> None:
        if batch > self.max_batch_size or tokens > self.max_seq_len:
            raise BudgetError(
                f"batch {batch} x {tokens} tokens exceeds the KV cache reserved at load "
                f"({self.max_batch_size} x {self.max_seq_len}): pass larger max_batch_size / max_seq_len "
                "to tiermem.load")

    def _offloads_kv(self) -> bool:
        return self.device.type == "cuda" and self.kv_placement in ("cpu", "disk")

    def _offload_class(self) -> type[HostKVCache]:
        return DiskKVCache if self.kv_placement == "disk" else HostKVCache

    def _graph_cache(self, batch: int, max_len: int) -> KVCache | None:
        """The KV cache of the last generation's graph replays, emptied, if it has `batch` rows and room for max_len
        tokens: steps over a span that its graph covers replay it, with no new capture (60-65 ms a span for
        llama3-8b at batch 16). Otherwise None, and the kept graphs and cache are let go first."""
        kept = self._graphs
        if kept is not None and kept.cache.batch == batch and kept.cache.max_len >= max_len:
            kept.cache.clear()
            return kept.cache
        self._graphs = None
        return None

    def _new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache where this model keeps KV: on the device, in pinned host memory (HostKVCache) or in
        a file in offload_dir (DiskKVCache)."""
        if not self._offloads_kv():
            return KVCache.allocate(self.config, batch, max_len, self.dtype, self.device, kv_quant=self.kv_quant)
        reserved = kv_cache_bytes(self.config, self.max_batch_size, self.max_seq_len, self.dtype, self.kv_quant)
        live = sum(c.nbytes for c in self._host_caches if not c.closed)
        wanted = kv_cache_bytes(self.config, batch, self.max_seq_len, self.dtype, self.kv_quant)
        if live + wanted > reserved:
            raise BudgetError(f"the {self.kv_placement} KV cache reserved at load ({format_size(reserved)}) is held "
                              f"by {format_size(live)} of live GenerationSessions; {format_size(wanted)} more are "
                              "needed: drop or finish those sessions (del session) first")
        # Room for max_seq_len tokens (within the reservation), so that a session never has to grow it.
        if self.kv_placement == "disk":
            cache = DiskKVCache.allocate(self.config, batch, self.max_seq_len, self.dtype, self.device,
                                         kv_quant=self.kv_quant, offload_dir=self.offload_dir, pool=self._kv_arenas)
        else:
            cache = HostKVCache.allocate(self.config, batch, self.max_seq_len, self.dtype, self.device,
                                         kv_quant=self.kv_quant, cpu_attention=self.cpu_attention,
                                         pool=self._kv_arenas)
        self._host_caches.add(cache)
        return cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                micro_batches: int | None = None) -> torch.Tensor:
        """LongTensor [B, T] -> float32 logits [B, T, V] on input_ids' device (no cache).

        micro_batches: split the batch so (None: the load's prefill split, the plan's by default)."""
        self._check_open()
        _check_ids(input_ids, self.config)
        _check_mask(attention_mask, for_generation=False)
        self._check_fits(*input_ids.shape)
        split = self.prefill_micro_batches if micro_batches is None else micro_batches  # the executor checks it
        logits = self.executor.forward(input_ids, attention_mask, micro_batches=split)
        return logits.to(input_ids.device, torch.float32)

    def generate(
        self, input_ids: torch.Tensor | None, max_new_tokens: int = 32, do_sample: bool | None = None,
        attention_mask: torch.Tensor | None = None, *, temperature: float | None = None, top_k: int | None = None,
        top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
        seed: int | None = None, generator: torch.Generator | None = None, micro_batches: int | None = None,
        on_step: Callable[[int], None] | None = None, session: GenerationSession | None = None,
    ) -> torch.Tensor:
        """Batched greedy or sampled decoding with a KV cache: LongTensor [B, T] -> [B, T + n] (on the CPU).

        Left-pad batches and pass attention_mask (0 = padding). Sampling: do_sample (default False),
        temperature (1.0), top_k (0 = off), top_p (1.0 = off); seed or generator make it reproducible.
        eos_token_id defaults to the config's ([] = never stop); rows that finished emit pad_token_id
        (default: the config's, else the first EOS id); n < max_new_tokens only when every row hit EOS.
        on_step(k) is called after the k-th new token of this call. micro_batches: run the batch as
        that many slices through each streamed block, prompt and decode steps alike (None: the load's
        choices, the plan's by default: the prompt may be split finer than decode steps, to fit memory).
        With CUDA graph replays (cuda_graphs), a call's KV cache and captured graph (of the last span it reached)
        stay allocated for the next call of the same batch that fits that cache, which replays the graph where
        its steps cover the same span instead of capturing it again; any other call, or close(), frees them.

        session: a `tiermem.GenerationSession` to keep the state in, so that generation can continue
        later, also after `tiermem.checkpoint.save_async(session.state_dict(), path)` and a restore
        into a freshly loaded model. An empty session is filled from input_ids and the sampling
        arguments (sampling without seed or generator draws the session's seed from torch's global
        RNG). A filled session continues for max_new_tokens more tokens, exactly as one longer call
        would have gone on; input_ids may be None (or the session's tokens), attention_mask must be
        None, the sampling arguments must be left out or equal the session's, and seed / generator
        must be left out (ConfigError otherwise). Returns every token so far: prompt + all generated.
        """
        self._check_open()
        _check_generate_arguments(max_new_tokens, seed, generator, on_step, session)
        _check_micro_batches(micro_batches)
        split = micro_batches or self.micro_batches
        keeps_graphs = session is None and self.cuda_graphs and split == 1
        if not keeps_graphs:
            self._graphs = None  # a call that will not replay them lets the kept graphs and KV cache go first
        requested = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        if session is not None and session.started:
            state, sampling = self._continue_session(session, input_ids, attention_mask, max_new_tokens,
                                                     requested, seed, generator)
        else:
            _check_ids(input_ids, self.config)
            B, T = input_ids.shape
            self._check_fits(B, T + max_new_tokens)
            pad = self.config.pad_token_id  # some configs carry -1: finished rows then emit the first EOS id
            defaults = dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=self.config.eos_token_id,
                            pad_token_id=pad if pad is not None and 0 <= pad < self.config.vocab_size else None)
            sampling = Sampling.make(**{k: defaults[k] if v is None else v for k, v in requested.items()})
            outside = [e for e in sampling.eos_token_id if not 0 <= e < self.config.vocab_size]
            if requested["eos_token_id"] is not None and outside:
                raise ConfigError(f"eos_token_id {outside[0]} is not a token of this model (vocabulary "
                                  f"{self.config.vocab_size}): no row could ever finish on it")
            if sampling.pad_token_id is not None and not 0 <= sampling.pad_token_id < self.config.vocab_size:
                which = (f"pad_token_id {sampling.pad_token_id}" if requested["pad_token_id"] is not None
                         or defaults["pad_token_id"] is not None else
                         f"the first eos_token_id {sampling.pad_token_id} (no pad_token_id is set, so it pads)")
                raise ConfigError(f"{which} is not a token of this model (vocabulary {self.config.vocab_size}): "
                                  "finished rows emit it; pass a pad_token_id of the vocabulary")
            _check_mask(attention_mask, for_generation=True)
            if generator is None and seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(seed)
            if session is not None:
                sampling.check()  # before the session is filled: it keeps these settings
                if generator is None and sampling.do_sample:
                    seed = int(torch.randint(0, 2**62, (1,)))
                    generator = torch.Generator(device=self.device).manual_seed(seed)
            cache = self._graph_cache(B, T + max_new_tokens) if keeps_graphs else None
            if cache is None:
                cache = self._new_cache(B, T + max_new_tokens)
            state = DecodeState.start(input_ids, attention_mask, cache, generator)
            if session is not None:
                session._start(self.config, state, sampling, self.weights_id)
        on_device = type(state.cache) is KVCache  # a restored session may hold its cache elsewhere
        graphs = None
        if self.cuda_graphs and on_device and split == 1:  # _graphs is left only where _graph_cache kept its cache
            graphs = self._graphs or StaticDecoder(self.executor, state.cache, graphs=True)
            if keeps_graphs:
                self._graphs = graphs  # a session's cache stays the session's
        try:
            decode(self.executor, state, sampling, max_new_tokens, split, on_step,
                   prefill_micro_batches=micro_batches or self.prefill_micro_batches, step_decoder=graphs)
        finally:
            if isinstance(state.cache, HostKVCache):  # also DiskKVCache
                if session is None:
                    state.cache.close()  # pinned memory back now, not whenever the cache is collected
                else:
                    state.cache.flush()  # nothing in flight once generate returns: dropping the session frees it
        return state.tokens.to("cpu", copy=session is not None)

    def _continue_session(
        self, session: GenerationSession, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
        max_new_tokens: int, requested: dict, seed: int | None, generator: torch.Generator | None,
    ) -> tuple[DecodeState, Sampling]:
        """Check a continuation request against a filled session; bind it here, with room for the tokens."""
        session._check_request(requested, generator, seed)
        session._check_model(self.config, self.weights_id)
        if attention_mask is not None:
            raise ConfigError("attention_mask applies to the first generate call of a session only; "
                              "pass None to continue it")
        tokens = session.tokens
        if input_ids is not None and not (isinstance(input_ids, torch.Tensor)
                                          and torch.equal(input_ids.to(tokens.device), tokens)):
            raise ConfigError("input_ids differ from the tokens the GenerationSession holds: pass None to "
                              "continue the session, or start a new GenerationSession for a new prompt")
        B, width = tokens.shape
        self._check_fits(B, width + max_new_tokens)
        if self._offloads_kv() and not isinstance(session.cache, self._offload_class()):  # e.g. restored
            host = self._new_cache(B, self.max_seq_len)
            host.copy_from(session.cache)
            session._state.cache = host
        state = session._bind(self.dtype, self.device)
        if state.cache.max_len < width + max_new_tokens:  # grow (doubling: fewer copies over many calls)
            state.cache.grow(min(self.max_seq_len, max(width + max_new_tokens, 2 * state.cache.max_len)))
        return state, session.sampling

    @property
    def tokenizer(self):
        """The store's tokenizers.Tokenizer (from tokenizer.json)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = getattr(self.reader, "path", None)
            path = path / "tokenizer.json" if path is not None else None
            if path is None or not path.is_file():
                raise ConfigError("this store has no tokenizer.json: pass token ids to generate() instead")
            try:
                self._tokenizer = Tokenizer.from_file(str(path))
            except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
                raise StoreError(f"{path} cannot be read as a tokenizer ({exc}); re-pack the store from a "
                                 "checkpoint with a valid tokenizer.json") from exc
        return self._tokenizer

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int = 32, *, progress: bool = False,
                      **kwargs) -> tuple[list[str], int]:
        """Encode prompts, generate (left-padded batch), decode the new tokens. Returns (texts, new tokens)."""
        from tqdm import tqdm

        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConfigError("prompts must be a non-empty list of strings")
        if "attention_mask" in kwargs:
            raise ConfigError("generate_text pads the prompts and makes their attention_mask itself: leave it out")
        tok = self.tokenizer
        ids = [tok.encode(p).ids for p in prompts]
        if any(not x for x in ids):
            raise ConfigError("a prompt encodes to no tokens: give non-empty prompts")
        width = max(map(len, ids))
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with tqdm(total=max_new_tokens, unit="tok", desc="generate", disable=not progress) as bar:
            out = self.generate(input_ids, max_new_tokens, attention_mask=mask,
                                on_step=lambda _k: bar.update(1), **kwargs)
        new = out[:, width:]
        texts = [tok.decode(row.tolist(), skip_special_tokens=True) for row in new]
        return texts, int(new.numel())

    @functools.cached_property
    def weights_id(self) -> str | None:
        """An id of the store's weights (a digest of its blocks' checksums); None for a store without a manifest
        (a synthetic one in memory). A GenerationSession continues only on a model with the same id."""
        manifest = getattr(self.reader, "manifest", None)
        if manifest is None:
            return None
        checksums = json.dumps([(b["name"], b["checksum"]) for b in manifest["blocks"]]).encode()
        return hashlib.sha256(checksums).hexdigest()[:16]

    def info(self) -> dict:
        """Placement and sizes: where each block lives, budgets, KV reservation."""
        kv = "none" if self.kv_quant is None else f"{self.kv_quant.name} (group {self.kv_quant.group_size})"
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."), "kv_quant": kv,
                "cuda_graphs": self.cuda_graphs, **self.source.describe()}

    def close(self) -> None:
        if not self._closed:
            self._graphs = None
            self.source.close()
            self._kv_arenas.close()
            self._closed = True

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_micro_batches(micro_batches: int | None) -> None:
    """Up front, where a 0 would otherwise be taken as the default (or fail half-way into a generation)."""
    if micro_batches is not None and micro_batches < 1:
        raise ConfigError(f"micro_batches must be >= 1 (None: the load's choice), got {micro_batches}")


def _check_generate_arguments(max_new_tokens: object, seed: object, generator: object, on_step: object,
                              session: object) -> None:
    """ConfigError for generate() arguments of the wrong type or range (before anything runs)."""
    check_integer("max_new_tokens", max_new_tokens, minimum=0)
    if seed is not None:
        check_integer("seed", seed, minimum=0)
        if seed >= 2**63:  # what torch.Generator.manual_seed takes
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if on_step is not None and not callable(on_step):
        raise ConfigError(f"on_step must be callable (it is called with each step's index), got {on_step!r}")
    if session is not None and not isinstance(session, GenerationSession):
        raise ConfigError(f"session must be a tiermem.GenerationSession, got {type(session).__name__}")


def _check_mask(attention_mask: object, for_generation: bool) -> None:
    """ConfigError for a mask that is not a 2-D tensor of 0 and 1; for generation also for a row without tokens
    and for padding after a row's tokens (the next token would follow a pad)."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ConfigError("attention_mask must be a tensor [batch, tokens] of 1 (token) and 0 (padding), got "
                          + (f"shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor)
                             else type(attention_mask).__name__))
    if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ConfigError("attention_mask holds values other than 0 and 1: 1 marks a token, 0 padding")
    if not for_generation:
        return
    real = attention_mask.bool()
    if attention_mask.numel() and not bool(real.any(dim=1).all()):
        raise ConfigError("attention_mask has a row of padding only: every row needs at least one token to "
                          "continue from")
    if bool((real[:, :-1] & ~real[:, 1:]).any()):
        raise ConfigError("attention_mask has padding after a row's tokens: generate() continues each row from "
                          "its last position, so pad on the left (zeros first, as tokenizers do with "
                          "padding_side='left')")


def _check_ids(input_ids: torch.Tensor, cfg: ModelConfig) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ConfigError("input_ids must be a LongTensor of shape [batch, tokens]")
    if not input_ids.numel():
        raise ConfigError(f"input_ids of shape {tuple(input_ids.shape)} holds no token: give at least one row "
                          "of at least one token")
    if (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
        raise ConfigError(f"token ids must lie in [0, {cfg.vocab_size}) for this model")


def store_info(store: str | os.PathLike) -> dict:
    """Config, sizes per block and quantization of a store (for `tiermem info`)."""
    reader = StoreReader(store)
    cfg = model_config_from_hf(reader.model_config)
    sizes = {b: reader.block_nbytes(b) for b in reader.block_names}
    layers = [s for b, s in sizes.items() if b.startswith("layers.")]
    experts = {}
    if cfg.moe is not None:
        moe = cfg.moe
        experts["experts"] = (f"{moe.num_experts} of width {moe.intermediate_size}, {moe.top_k} per token, in "
                              f"{sum(moe.sparse_layers)} of the {cfg.num_layers} layers")
    return {
        "store": str(reader.path),
        "architecture": cfg.model_type,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads / kv heads": f"{cfg.num_heads} / {cfg.num_kv_heads}",
        **experts,
        "vocab_size": cfg.vocab_size,
        "quant": "none" if reader.quant is None else f"{reader.quant.name} (group {reader.quant.group_size})",
        "total size": format_size(sum(sizes.values())),
        "embed block": format_size(sizes.get("embed", 0)),
        "largest layer block": format_size(max(layers, default=0)),
        "head block": format_size(sizes.get("head", 0)),
        "kv per token": format_size(kv_cache_bytes(cfg, 1, 1, torch.float16)) + " (fp16)",
        "tokenizer": ", ".join(reader.manifest.get("tokenizer_files", [])) or "none",
    }

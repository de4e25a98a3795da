"""The cost of one decode step for a given placement: pure arithmetic over byte counts and link rates.

A decode step produces one token for each of `batch` sequences. Per step, with L layers, B = batch,
m micro-batches, c = prompt_len + gen_len / 2 (the mean context over the generation) and
kv = KV bytes per token per layer (K and V, compute dtype):

  disk    = bytes of the blocks streamed from disk / disk_read_Bps
            + KV on disk: Workload.disk_kv_s, the tier's reads and writes timed through DiskKVCache in offload_dir
              by tiermem.disk_kv_probe; (L*B*c*kv read back + L*B*kv new slots written) / disk_read_Bps where not
              measured (that missed a layer's 3-5 ms that do not scale with its bytes)
  pcie    = (bytes of every streamed block, from host or disk (of a sparse layer streamed from host RAM, where an
             unsplit step takes engine.moe.chosen_experts: less its routed experts no token chose,
             expert_share * (1 - top_k / E) ** B of its bytes with the routing spread evenly, since tiermem.gpu_tier
             copies those experts on demand; a split step is counted whole, see Workload.host_stream_share)
             + KV on CPU or disk with GPU attention: L*B*c*kv read over PCIe each step
             + KV on CPU with CPU attention: L*B*(q + attention output + new K/V) activations) / h2d_Bps
  hbm     = (m * f(B/m) * bytes of all GPU-side weights the step uses (every micro-batch reads them; f = 1 for
               dense weights; quantized ones at r rows a micro-batch: 1 up to 16 rows, ceil(r/16) up to 32 (the
               fused GEMV reads the weight once per chunk: 8 rows up to 8, 16 beyond), beyond that 1 + 2 *
               dense/stored bytes
               (dequantized to a dense copy, written, then read by the matmul); of a sparse layer's experts, those
               the step runs, Workload.read_share: one copy per pick where the routed GEMV runs them)
             + streamed bytes (written into the ring slots)
             + KV on GPU: L*B*(c + 1)*kv (read + append); KV on CPU, GPU attention: 2*L*B*c*kv;
               KV on disk: 4*L*B*c*kv (landed, permuted: read + write, read by attention)) / hbm_Bps
  compute = B * (L * matmul FLOPs per token per layer + head FLOPs + L*c*attention FLOPs) / matmul_flops
  cpu_att = KV on CPU and attention computed there (FlexGen's cpu_cache_compute): Workload.cpu_attention_s[m],
            HostKVCache.attend timed on this machine at the step's rows and context by tiermem.host_probe;
            L*B*c*kv / cpu_memcpy_Bps where not measured (at short contexts that misses the per-call costs)
  host    = the CPU time of issuing the step (Python, torch dispatch, kernel launches): Workload.host_step_s[m],
            measured on this machine by tiermem.host_probe (as CUDA graph replays where the load uses them);
            per_layer_overhead_s * L * m where not measured
  kernels = the GPU time of the step's kernels: Workload.gpu_step_s[m], measured on this machine by
            tiermem.gpu_probe at the model's width, rows and context (the kernels reach a fraction of the HBM
            copy rate: llama3-8b int4, batch 16 x 2048 on an H200, 15 ms where hbm says 2.9); 0 where not measured,
            and with CPU attention (the probe's kernels include the attention that runs on the host there)

  step = max(disk, pcie, max(hbm, compute, kernels, host))                 GPU attention
  step = max(disk, pcie, max(hbm, compute, host)) + cpu_att                CPU attention;  tok/s = B / step
  step = max(disk, pcie, hbm, compute, kernels + host)                     CUDA graphs (Workload.cuda_graphs)

With CUDA graphs the host's part of a step (the step's static inputs, the replay's launch, the sampling) and the
replay run one after the other where the caller waits for each step's token, as bench does to time it (and
decode, to check the rows, where EOS ids are set): the replay has nothing to run before the host launches it
(llama3-8b int4, batch 16 x 2048 on an H200: steps of the host's part + 9.0 ms for host parts of 1.1-7.3 ms,
_s10call3_, when the host still embedded each token itself; the kernel probe read 8.98 ms). Since session 12 the
graph gathers the tokens' embedding on the GPU (engine.static_decode), so a caller that does not wait lets the
host issue a step while the GPU replays the one before; the model does not count on that.

Disk, PCIe and GPU work overlap (load j+k || compute j, and the ring is primed across step
boundaries), and the host issues kernels ahead of the GPU (no decode step waits for the GPU unless
EOS ids are set), so the step costs its slowest stage. CPU attention runs on the host in the middle
of each layer, after the GPU has produced q, k and v and before it may go on: the host and the GPU
wait for each other there (llama3-8b int4, batch 16 x 2048, weights resident: 163 ms per step against
43 ms host + 112 ms CPU attention predicted, llama3_8b_int4_b16x2048_kv_cpu_attention_h200.json), and
while the host computes it, it issues no copy either, so that the weight stream runs dry after its
lookahead: it adds to the whole step (111B int4 in 24 GiB, weights streamed over PCIe, batch 32:
0.837 s against 0.656 s of PCIe, llama111b_int4_gpu24_host_plan_cpu_attention_s6call3_h200.json). In this steady state
lookahead buys no speed (it absorbs jitter, which the model does not see) and costs ring memory.
FlexGen's model (per layer, prefill and decode, fitted constants) has the same shape; ours has only
the decode step, measured link rates and no fitted constants.

Memory (hard limits; a plan must fit both):
  GPU    = resident blocks + (lookahead + 1) slots of the largest streamed block
           + KV (all of it when on GPU; two layers' worth when on CPU with GPU attention; on disk, two
             layers plus a landing buffer of half a layer for the token-major -> head-major permute)
           + workspace: the larger of the prefill's activations split into m_p micro-batches and a decode
             step's split into m (prefill and decode may split a batch differently: only m costs time)
  pinned = host-resident blocks + host-only blocks (embed) + (lookahead + 1) staging buffers of the
           largest disk block (when any block streams from disk) + KV (all of it when on CPU; two
           layers of staging when on disk)
KV is reserved for batch x (prompt_len + gen_len) tokens, as tiermem.placement.kv_cache_bytes does
(on disk: a file of that size in offload_dir, outside both budgets).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tiermem.engine.moe import MoeConfig, picks_cover_experts, picks_fewer_than_experts
from tiermem.errors import ConfigError
from tiermem.kernels.cupy_ops import gemv_chunks
from tiermem.kernels.ops import GEMV_SPLIT_ROWS
from tiermem.moe_traffic import chosen_fraction
from tiermem.storage.moe_names import is_routed_expert

DEFAULT_LAYER_OVERHEAD_S = 50e-6
KV_MODES = (("gpu", False), ("cpu", False), ("cpu", True))  # (kv placement, cpu_cache_compute)
DISK_KV_MODE = ("disk", False)  # searched only when the caller has a directory for the KV file


def kv_memory(kv_bytes: int, num_layers: int, kv: str, cpu_cache_compute: bool) -> tuple[int, int]:
    """(GPU, pinned host) bytes a KV cache of kv_bytes in all takes where it lives (see the module doc):
    "gpu" all of it in HBM; "cpu" all of it pinned and two layers' buffers in HBM (none with CPU attention);
    "disk" two layers of pinned staging and, in HBM, two layers' buffers and a landing buffer of half a layer."""
    layer = kv_bytes // num_layers
    if kv == "gpu":
        return kv_bytes, 0
    if kv == "cpu":
        return (0 if cpu_cache_compute else 2 * layer), kv_bytes
    return 2 * layer + layer // 2, 2 * layer


@dataclass(frozen=True)
class Hardware:
    """Link and compute rates of one machine, in bytes/s and FLOP/s."""

    disk_read_Bps: float
    h2d_Bps: float  # pinned host -> HBM
    hbm_Bps: float  # device copy, bytes read + written
    matmul_flops: float  # dense fp16/bf16 FLOP/s achievable
    cpu_memcpy_Bps: float  # host memory read rate (CPU-side attention over the KV cache)
    name: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"Hardware.{f.name} must be a positive number, got {value!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, data: str | Mapping[str, Any]) -> Hardware:
        """From JSON text or a dict; unknown keys are ignored, missing ones are an error."""
        d = json.loads(data) if isinstance(data, str) else dict(data)
        d = d.get("hardware", d)  # a probe cache file wraps the figures
        names = {f.name for f in fields(cls)}
        missing = sorted(names - {"name"} - set(d))
        if missing:
            raise ConfigError(f"hardware JSON lacks {missing}; it needs {sorted(names - {'name'})} "
                              "(write it with `Hardware.to_json` or let tiermem.probe measure it)")
        return cls(**{k: (str(v) if k == "name" else float(v)) for k, v in d.items() if k in names})

    @classmethod
    def from_ceilings(cls, ceilings: Mapping[str, Any], *, matmul_flops: float = 6e14,
                      disk_read_Bps: float = 1.3e9, cpu_memcpy_Bps: float = 10e9) -> Hardware:
        """From tiermem.ceilings.measure_ceilings() output (as recorded in benchmark JSON); a "cpu_memcpy_Bps"
        recorded there (bench runs with attention on the host before session 7) wins over the default."""
        return cls(disk_read_Bps=disk_read_Bps, h2d_Bps=float(ceilings["h2d_pinned_Bps"]),
                   hbm_Bps=float(ceilings["hbm_Bps"]), matmul_flops=matmul_flops,
                   cpu_memcpy_Bps=float(ceilings.get("cpu_memcpy_Bps", cpu_memcpy_Bps)),
                   name=str(ceilings.get("gpu_name", "")))


@dataclass(frozen=True)
class Workload:
    """A model's block sizes as stored (int4/int8 included) and what one decode step of it costs.

    block_bytes: block name -> bytes as stored, in execution order. host_only: blocks used where
    they are in host memory (the token embedding: only gathered rows move). workspace_bytes:
    micro-batch count -> HBM bytes of a prefill's transient activations (tiermem.placement.workspace_bytes);
    decode_workspace_bytes: the same for a decode step (empty: the prefill's figures stand for both).
    host_step_s: micro-batch count -> host seconds of issuing a decode step (tiermem.host_probe; empty:
    step_cost's per_layer_overhead_s stands in). cpu_attention_s: micro-batch count -> host seconds of the step's
    attention computed on the host (tiermem.host_probe.cpu_attention_step_seconds; empty: the KV bytes at the host
    copy rate). disk_kv_s: seconds of the step's KV reads and writes with the KV cache on disk
    (tiermem.disk_kv_probe.disk_kv_step_seconds; 0: the KV bytes at the disk's read rate). gpu_step_s: micro-batch
    count -> GPU seconds of a decode step's kernels (tiermem.gpu_probe; empty: not counted). cuda_graphs: decode
    steps are CUDA graph replays, which follow the host's part of the step (host_step_s is that part then).
    dense_per_stored: bytes of a quantized weight dequantized to the compute dtype per byte as stored (0: the
    weights are stored dense). moe: the model's sparse MLP (None: a dense model); expert_share: the share of the
    layers' weights that are routed experts.
    """

    block_bytes: Mapping[str, int]
    num_layers: int
    kv_bytes_per_token_layer: int
    flops_per_token_layer: float
    batch: int = 1
    prompt_len: int = 512
    gen_len: int = 32
    head_flops_per_token: float = 0.0
    attn_flops_per_token_ctx_layer: float = 0.0
    act_bytes_per_token_layer: int = 0
    host_only: tuple[str, ...] = ("embed",)
    workspace_bytes: Mapping[int, int] = field(default_factory=dict)
    decode_workspace_bytes: Mapping[int, int] = field(default_factory=dict)
    host_step_s: Mapping[int, float] = field(default_factory=dict)
    cpu_attention_s: Mapping[int, float] = field(default_factory=dict)
    gpu_step_s: Mapping[int, float] = field(default_factory=dict)
    cuda_graphs: bool = False
    disk_kv_s: float = 0.0
    dense_per_stored: float = 0.0
    moe: MoeConfig | None = None
    expert_share: float = 0.0

    def __post_init__(self) -> None:
        if min(self.batch, self.num_layers) < 1 or self.prompt_len < 0 or self.gen_len < 1:
            raise ConfigError(f"workload needs batch, layers and gen_len >= 1 and prompt_len >= 0: {self.batch}, "
                              f"{self.num_layers}, {self.gen_len}, {self.prompt_len}")
        unknown = set(self.host_only) - set(self.block_bytes)
        if unknown:
            raise ConfigError(f"host-only blocks {sorted(unknown)} are not blocks of the model")

    @property
    def block_names(self) -> tuple[str, ...]:
        return tuple(self.block_bytes)

    @property
    def streamable(self) -> tuple[str, ...]:
        """Blocks the planner places (every block but the host-only ones), in execution order."""
        return tuple(b for b in self.block_bytes if b not in self.host_only)

    @property
    def mean_context(self) -> float:
        return self.prompt_len + self.gen_len / 2

    @property
    def kv_reserved_bytes(self) -> int:
        return self.num_layers * self.batch * (self.prompt_len + self.gen_len) * self.kv_bytes_per_token_layer

    def weight_traffic(self, rows: int) -> float:
        """HBM bytes a decode micro-batch of `rows` rows moves per stored byte of the weights it uses (module doc):
        the fused GEMV takes up to GEMV_SPLIT_ROWS rows, in chunks that each read the weight (cupy_ops.gemv_chunks);
        more rows are dequantized first."""
        if not self.dense_per_stored:
            return 1.0
        if rows <= GEMV_SPLIT_ROWS:
            return float(gemv_chunks(rows))
        return 1.0 + 2.0 * self.dense_per_stored

    def read_share(self, rows: int) -> float:
        """Share of a block's weight bytes that a decode micro-batch of `rows` rows reads once in HBM: of a sparse
        layer's routed experts, one copy per pick where the step takes engine.moe.routed_experts (quantized weights,
        engine.moe.picks_fewer_than_experts), the chosen ones (tiermem.moe_traffic.chosen_fraction) where it takes
        chosen_experts, every one where it takes all_experts (picks_cover_experts, or a CUDA graph of experts the
        routed GEMV does not take); 1 for a dense model."""
        moe = self.moe
        if moe is None or picks_cover_experts(moe, rows):
            return 1.0
        if self.dense_per_stored and picks_fewer_than_experts(moe, rows):
            return 1.0 - self.expert_share * (1.0 - rows * moe.top_k / moe.num_experts)
        if self.cuda_graphs:
            return 1.0
        return 1.0 - self.expert_share * (1.0 - chosen_fraction(moe, rows))

    def host_stream_share(self, micro_batches: int) -> float:
        """Share of the bytes of the blocks streamed from host RAM that a decode step split into `micro_batches`
        copies: all of them, unless the whole batch takes engine.moe.chosen_experts (engine.moe.picks_cover_experts
        is false for it), whose unchosen experts (tiermem.moe_traffic.chosen_fraction) stay in host RAM
        (tiermem.gpu_tier; the module doc).

        A split step is counted whole: each micro-batch's host sync waits for the expert copies of the one before,
        which neither this model nor the host probe sees (Mixtral-8x22B int4 in 24 GiB, batch 8 in 4 micro-batches
        of chosen experts: 1.27 s a step, host-bound, predicted 0.88; in one micro-batch, every expert: 1.00 s,
        benchmarks/results/mixtral_8x22b_int4_gpu24_host*_s15call{2,4}_h200.json)."""
        if self.moe is None or micro_batches > 1 or picks_cover_experts(self.moe, self.batch):
            return 1.0
        return 1.0 - self.expert_share * (1.0 - chosen_fraction(self.moe, self.batch))

    def workspace(self, micro_batches: int, prefill_micro_batches: int | None = None) -> int:
        """HBM activations of decode steps split into micro_batches and a prefill split into
        prefill_micro_batches (None: the same)."""
        prefill = self.workspace_bytes.get(prefill_micro_batches or micro_batches, 0)
        return max(prefill, self.decode_workspace_bytes.get(micro_batches, 0))

    @classmethod
    def from_config(cls, cfg, block_bytes: Mapping[str, int], batch: int = 1, prompt_len: int = 512,
                    gen_len: int = 32, dtype=None, quantized: bool = False, kv_quant=None,
                    host_step_s: Mapping[int, float] | None = None,
                    cpu_attention_s: Mapping[int, float] | None = None) -> Workload:
        """From an engine ModelConfig and the block sizes of its store; dtype: the compute dtype;
        quantized: the store holds int4/int8 weights (see placement.workspace_bytes); kv_quant: the
        QuantScheme the KV cache is stored in (None: the compute dtype); host_step_s: measured host
        seconds of a decode step by micro-batch count (tiermem.host_probe.host_step_seconds); cpu_attention_s:
        measured host seconds of its attention on the host (tiermem.host_probe.cpu_attention_step_seconds)."""

        from tiermem.engine.config import expected_weights, gpu_compute_dtype
        from tiermem.placement import kv_cache_bytes, workspace_bytes

        dtype = gpu_compute_dtype(cfg, dtype)
        shapes = expected_weights(cfg)
        matmul = sum(s[0] * s[1] for s in shapes["layers.0"].values() if len(s) == 2)  # weights stored
        active = _active_matmul_elements(cfg, shapes)
        q_dim, e = cfg.num_heads * cfg.head_dim, dtype.itemsize
        return cls(
            block_bytes=dict(block_bytes), num_layers=cfg.num_layers,
            kv_bytes_per_token_layer=kv_cache_bytes(cfg, 1, 1, dtype, kv_quant) // cfg.num_layers,
            flops_per_token_layer=2.0 * active, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
            head_flops_per_token=2.0 * cfg.vocab_size * cfg.embed_dim,
            attn_flops_per_token_ctx_layer=4.0 * q_dim,
            act_bytes_per_token_layer=(2 * q_dim + 2 * cfg.num_kv_heads * cfg.head_dim) * e,
            workspace_bytes={m: workspace_bytes(cfg, batch, prompt_len + gen_len, m, dtype, quantized,
                                                kv_quant is not None)
                             for m in divisors(batch)},
            decode_workspace_bytes={m: workspace_bytes(cfg, batch, prompt_len + gen_len, m, dtype, quantized,
                                                       kv_quant is not None, new_tokens=1) for m in divisors(batch)},
            host_step_s=dict(host_step_s or {}), cpu_attention_s=dict(cpu_attention_s or {}),
            dense_per_stored=matmul * e / block_bytes["layers.0"] if quantized else 0.0,
            moe=cfg.moe, expert_share=_routed_expert_share(cfg, shapes) if cfg.moe else 0.0,
        )


def _active_matmul_elements(cfg, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> float:
    """Weight elements one token multiplies in a layer, the mean over layers: of a sparse MLP's experts only
    its top_k (MoE models; the others are read where they are streamed, but not computed with)."""
    share = cfg.moe.top_k / cfg.moe.num_experts if cfg.moe is not None else 1.0
    total = 0.0
    for i in range(cfg.num_layers):
        total += sum(s[0] * s[1] * (share if is_routed_expert(name) else 1.0)
                     for name, s in shapes[f"layers.{i}"].items() if len(s) == 2)
    return total / cfg.num_layers


def _routed_expert_share(cfg, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> float:
    """The share of the layers' weight elements that are routed experts' (as stored: a quantized store keeps every
    matrix at the same bytes per element; the unquantized norms and routers are a few thousandths of a layer)."""
    layers = [shapes[f"layers.{i}"] for i in range(cfg.num_layers)]
    total = sum(math.prod(s) for layer in layers for s in layer.values())
    experts = sum(math.prod(s) for layer in layers for name, s in layer.items() if is_routed_expert(name))
    return experts / total


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def step_cost(w: Workload, hw: Hardware, *, resident: int, host: int, disk: int, kv: str,
              cpu_cache_compute: bool, micro_batches: int,
              per_layer_overhead_s: float = DEFAULT_LAYER_OVERHEAD_S) -> dict[str, float]:
    """Seconds per link of one decode step (see the module doc); "step" is the predicted step time.

    resident / host / disk: bytes of the blocks in HBM, streamed from pinned host, streamed from disk.
    """
    L, B, m = w.num_layers, w.batch, micro_batches
    kv_read = L * B * w.mean_context * w.kv_bytes_per_token_layer
    rows = math.ceil(B / m)
    host_share = w.host_stream_share(m)  # < 1: only the chosen experts are copied (on demand), and read
    host_read = host * (host_share if host_share < 1 else w.read_share(rows))
    weights_read = m * w.weight_traffic(rows) * ((resident + disk) * w.read_share(rows) + host_read)
    copied = host * host_share + disk
    disk_bytes, pcie_bytes, hbm_bytes = disk, copied, weights_read + copied
    disk_kv_s = 0.0
    flops = B * (L * w.flops_per_token_layer + w.head_flops_per_token)
    cpu_att = 0.0
    if kv == "gpu":
        hbm_bytes += kv_read + L * B * w.kv_bytes_per_token_layer
        flops += B * L * w.mean_context * w.attn_flops_per_token_ctx_layer
    elif cpu_cache_compute:
        pcie_bytes += L * B * w.act_bytes_per_token_layer
        cpu_att = w.cpu_attention_s.get(m, kv_read / hw.cpu_memcpy_Bps)
    elif kv == "disk":
        disk_kv_s = w.disk_kv_s or (kv_read + L * B * w.kv_bytes_per_token_layer) / hw.disk_read_Bps
        pcie_bytes += kv_read
        hbm_bytes += 4 * kv_read
        flops += B * L * w.mean_context * w.attn_flops_per_token_ctx_layer
    else:
        pcie_bytes += kv_read
        hbm_bytes += 2 * kv_read
        flops += B * L * w.mean_context * w.attn_flops_per_token_ctx_layer
    c = {"disk": disk_bytes / hw.disk_read_Bps + disk_kv_s, "pcie": pcie_bytes / hw.h2d_Bps,
         "hbm": hbm_bytes / hw.hbm_Bps, "compute": flops / hw.matmul_flops, "cpu_attention": cpu_att,
         "kernels": 0.0 if cpu_cache_compute else w.gpu_step_s.get(m, 0.0),
         "host": w.host_step_s.get(m, per_layer_overhead_s * L * m)}
    gpu_side = c["kernels"] + c["host"] if w.cuda_graphs else max(c["kernels"], c["host"])
    c["step"] = max(c["disk"], c["pcie"], c["hbm"], c["compute"], gpu_side) + cpu_att
    return c


KERNELS_OVER_HBM = 12.0  # the kernels of a step measured up to this many times its bytes at HBM's copy rate


def kernels_may_bound(cost: Mapping[str, float], cuda_graphs: bool = False) -> bool:
    """Whether the measured kernel time could set a step whose cost was taken without it: always for CUDA graph
    replays (their kernels add to the host's part); for an eager step, where it is predicted within
    KERNELS_OVER_HBM times its hbm or compute term (the kernels took 4.1x (bf16 KV) and 8.8x (int4 KV, its attention
    kernel slower than its bytes) the hbm term on an H200: llama3-8b int4 at batch 16 x 2048, session 12, call 6,
    with the weights read once at 16 rows as the GEMV reads them since)."""
    return cuda_graphs or cost["step"] < KERNELS_OVER_HBM * max(cost.get("hbm", 0.0), cost.get("compute", 0.0))


def bound_of(cost: Mapping[str, float]) -> str:
    """Name of the largest term of the step time: disk, pcie, hbm, compute, kernels, host or cpu_attention."""
    return max(("disk", "pcie", "hbm", "compute", "kernels", "host", "cpu_attention"), key=cost.__getitem__)


def memory(w: Workload, *, resident: int, host: int, slot: int, staging: int, kv: str, cpu_cache_compute: bool,
           micro_batches: int, lookahead: int, prefill_micro_batches: int | None = None) -> dict[str, int]:
    """Bytes each tier holds (see the module doc): gpu_* parts, host_* parts, the totals "gpu", "host", and
    "disk_kv" (the KV file in offload_dir, in neither budget).

    resident: bytes of HBM-resident blocks; host: bytes of host-resident streamed blocks; slot: the
    largest streamed block (0: none); staging: the largest disk block (0: none).
    """
    ring = lookahead + 1
    gpu_kv, host_kv = kv_memory(w.kv_reserved_bytes, w.num_layers, kv, cpu_cache_compute)
    m = {"gpu_weights": resident, "gpu_ring": ring * slot, "gpu_kv": gpu_kv,
         "gpu_workspace": w.workspace(micro_batches, prefill_micro_batches),
         "host_weights": host + sum(w.block_bytes[b] for b in w.host_only), "host_staging": ring * staging,
         "host_kv": host_kv, "disk_kv": w.kv_reserved_bytes if kv == "disk" else 0}
    m["gpu"] = sum(v for k, v in m.items() if k.startswith("gpu_"))
    m["host"] = sum(v for k, v in m.items() if k.startswith("host_"))
    return m

"""CUDA kernels of kernels/cuda/*.cu, compiled with NVRTC through CuPy and launched on torch tensors.

Torch tensors go to the kernels as raw device pointers (no copies), on torch's current stream.
Each source is compiled once per device (`_module`, cached) and CuPy keeps the binaries in its
on-disk cache. A decode step issues thousands of launches from the host, so `_launch` and the
wrappers keep their per-call Python work small. CuPy is imported lazily: this module imports on
machines without CuPy or CUDA, where `cuda_kernels_available()` is False. Shapes and layouts:
kernels/quant.py and the comments at the top of each .cu file; the torch reference of every kernel
is kernels/reference.py.
"""

from __future__ import annotations

import functools
import math
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tiermem.errors import TiermemError
from tiermem.kernels.quant import QuantizedWeight

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
GEMV_MAX_BATCH = 8  # rows of x per batch tile of the fused GEMV (mma n = 8); one launch takes all chunks
GEMV_MAX_CHUNKS = 65535  # chunks per launch: they are blockIdx.y (gridDim.y's limit)
HALF_DTYPES = (torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of the fused GEMV: 16 * m_tiles rows per block of `warps` warps, each lane
    streaming `unroll` 16-byte chunks of 2 * m_tiles rows per step, and batch_tiles (1 or 2) tiles of 8 batch
    rows per block, which share each weight fragment: a batch of more than 8 rows goes in chunks of
    8 * batch_tiles, each reading the whole weight (see kernels/cuda/gemv.cu)."""

    unroll: int = 2
    m_tiles: int = 1
    warps: int = 8
    batch_tiles: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.warps <= 8:  # the kernels are built for blocks of at most 256 threads
            raise TiermemError(f"GemvConfig.warps must be 1..8, got {self.warps}")
        if self.batch_tiles not in (1, 2):
            raise TiermemError(f"GemvConfig.batch_tiles must be 1 or 2, got {self.batch_tiles}")


GEMV_VARIANTS = (GemvConfig(1, 1), GemvConfig(2, 1), GemvConfig(4, 1), GemvConfig(2, 2))
# Best for int4 fp16 and for most int8 cases at 28672x8192 and 8192x28672 on an H200 (bench_kernels.py,
# benchmarks/results/kernels_h200.json).
DEFAULT_GEMV = GemvConfig(2, 2, 8)
# For more than 8 rows. At 16 rows on an H200, int4 at 4096x14336, 14336x4096 and 28672x8192: 10-17% less time than
# DEFAULT_GEMV (bf16: 29.0-107.9 us against 34.6-123.4), the best variant of the sweep; int8: 0-16% above the best
# variant (u2m1 with two tiles was slower than either; benchmarks/results/kernels_gemv_batch_tiles_s12call5_h200.json).
DEFAULT_GEMV_WIDE = GemvConfig(1, 1, 8, batch_tiles=2)


@functools.cache
def cuda_kernels_available() -> bool:
    """True when CuPy imports, torch sees a CUDA device and it is sm_80 or newer (mma.sync bf16)."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # absent, or its CUDA libraries are
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def source_text(name: str, inlined: set[str] | None = None) -> str:
    """A .cu file with the headers it includes from CUDA_DIR inlined, each once (so CuPy's cache key covers them)."""
    inlined = set() if inlined is None else inlined
    lines = []
    for line in (CUDA_DIR / name).read_text().replace("#pragma once\n", "").splitlines(keepends=True):
        header = re.fullmatch(r'#include "(\w+\.cuh)"\n?', line)
        if header is None:
            lines.append(line)
        elif header.group(1) not in inlined:
            inlined.add(header.group(1))
            lines.append(source_text(header.group(1), inlined))
    return "".join(lines)


def _compile_options() -> tuple[str, ...]:
    """NVRTC options. CuPy itself adds -arch=sm_XX for the current device (a second -arch from us
    could conflict) and its include paths; the toolkit's include directory is added when there is one."""
    import cupy

    options = ["-std=c++17"]
    cuda_path = cupy.cuda.get_cuda_path()
    if cuda_path and (Path(cuda_path) / "include" / "cuda_fp16.h").exists():
        options.append(f"-I{Path(cuda_path) / 'include'}")
    return tuple(options)


@functools.cache
def _module(device_index: int, name: str):
    import cupy

    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=source_text(name), options=_compile_options())
        module.compile()
    return module


@functools.cache
def _function(device_index: int, source: str, kernel: str):
    import cupy

    with cupy.cuda.Device(device_index):
        return _module(device_index, source).get_function(kernel)


@functools.cache
def _external_stream(device_index: int, handle: int):
    """CuPy's view of a torch stream, made once per stream (creating one per launch costs host time)."""
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.cuda.ExternalStream(handle)


@functools.cache
def _cupy_cuda():
    import cupy

    return cupy.cuda


def _launch(device: torch.device, source: str, kernel: str, grid: int | tuple[int, ...], block: int, args: tuple,
            shared_mem: int = 0) -> None:
    """Launch `kernel` of `source` on torch's current stream of `device`.

    The driver launches in the calling thread's current context, and the kernel's module and the stream belong
    to `device`: CuPy's current device is switched (and restored) only when it is another one, since a context
    manager per launch costs several microseconds.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    fn = _function(index, source, kernel)
    stream = _external_stream(index, torch._C._cuda_getCurrentRawStream(index))
    grid = grid if isinstance(grid, tuple) else (grid,)
    cuda = _cupy_cuda()
    if cuda.runtime.getDevice() == index:
        fn(grid, (block,), args, shared_mem=shared_mem, stream=stream)
    else:
        with cuda.Device(index):
            fn(grid, (block,), args, shared_mem=shared_mem, stream=stream)


def _ptr(t: torch.Tensor | None) -> int:
    """A pointer kernel argument: CuPy passes a Python int as 8 bytes (int64). None is NULL."""
    return 0 if t is None else t.data_ptr()


_i32 = np.int32  # an `int` kernel argument: 4 bytes (a Python int would go as 8)


@functools.cache
def _i32s(*values: int) -> tuple[np.int32, ...]:
    """`int` kernel arguments that repeat from launch to launch (shapes), converted once."""
    return tuple(np.int32(v) for v in values)


def _grid_for(work: int, block: int) -> int:
    return max(1, min(math.ceil(work / block), 1 << 20))


def _aligned(t: torch.Tensor, nbytes: int = 16) -> bool:
    return t.data_ptr() % nbytes == 0


def _output(name: str, out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """`out` checked against the result's shape, dtype and device (tests pass NaN-poisoned buffers),
    or a new tensor."""
    dtype = like.dtype if dtype is None else dtype
    if out is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    matches = (tuple(out.shape), out.dtype, out.device) == (tuple(shape), dtype, like.device)
    if not matches or not out.is_contiguous():
        raise TiermemError(
            f"{name}: out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {like.device}"
        )
    return out


def _check_cuda(name: str, *tensors: torch.Tensor) -> None:
    index = tensors[0].get_device()  # -1 on the CPU
    for t in tensors:
        if index < 0 or t.get_device() != index:
            raise TiermemError(f"{name}: every tensor must be on the same CUDA device, got {t.device}")


# ---------------------------------------------------------------- quantized GEMV and dequantization


def _chunk_cols(qw: QuantizedWeight) -> int:
    return 128 // qw.scheme.bits  # columns per 16-byte chunk of qdata


def gemv_supported(qw: QuantizedWeight) -> bool:
    """Whether the fused GEMV takes this weight: rows of a whole number of 16-byte chunks, 16-byte
    aligned codes. Other shapes go through dequantize_cuda + matmul."""
    out_features, in_features = qw.shape
    return (
        out_features > 0
        and in_features > 0
        and qw.qdata.is_cuda
        and in_features % _chunk_cols(qw) == 0
        and qw.qdata.is_contiguous()
        and _aligned(qw.qdata)
    )


def default_gemv(batch: int) -> GemvConfig:
    """The launch shape quant_linear takes for `batch` rows of x when given none."""
    return DEFAULT_GEMV if batch <= GEMV_MAX_BATCH else DEFAULT_GEMV_WIDE


def batch_tiles(batch: int, config: GemvConfig) -> int:
    """Tiles of 8 batch rows per block of the fused GEMV for `batch` rows: one for at most 8, else config's."""
    return 1 if batch <= GEMV_MAX_BATCH else config.batch_tiles


def gemv_chunks(batch: int, config: GemvConfig | None = None) -> int:
    """Batch chunks of quant_linear's launch for `batch` rows (its blockIdx.y; config None: default_gemv's), each
    of which reads the whole weight."""
    config = config or default_gemv(batch)
    return math.ceil(batch / (GEMV_MAX_BATCH * batch_tiles(batch, config)))


def gemv_launch_plan(qw: QuantizedWeight, dtype: torch.dtype, config: GemvConfig,
                     batch: int = 1) -> tuple[str, int, int]:
    """Kernel name, rows per block and the cpg_shift argument for this weight and `batch` rows of x.

    The fast kernels need gs / chunk_cols to be a power of two at least `unroll` (a lane's chunks
    share one group); otherwise the unroll shrinks, or the per-column `general` kernel runs.
    """
    return _gemv_plan(qw.scheme.bits, qw.scheme.group_size, dtype, config.unroll, config.m_tiles,
                      batch_tiles(batch, config))


@functools.cache
def _gemv_plan(bits: int, group_size: int, dtype: torch.dtype, unroll: int, m_tiles: int,
               tiles: int) -> tuple[str, int, int]:
    chunks_per_group, rem = divmod(group_size, 128 // bits)
    prefix = f"quant_gemv_int{bits}_{_DTYPE_NAMES[dtype]}"
    suffix = "n2" if tiles == 2 else ""
    if rem or chunks_per_group & (chunks_per_group - 1):
        return f"{prefix}_general{suffix}", 16, 0
    shift = chunks_per_group.bit_length() - 1
    available = {(v.unroll, v.m_tiles) for v in GEMV_VARIANTS}
    unroll = min(unroll, chunks_per_group)
    m_tiles = m_tiles if (unroll, m_tiles) in available else 1
    if (unroll, m_tiles) not in available:
        unroll = 1
    return f"{prefix}_u{unroll}m{m_tiles}{suffix}", 16 * m_tiles, shift


def quant_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                 config: GemvConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y[..., O] = x[..., I] @ dequant(W)^T + bias for fp16/bf16 x, fused, in one launch: the rows of x go in
    chunks of GEMV_MAX_BATCH (8, the mma's n) times config.batch_tiles, one chunk per blockIdx.y, at most
    GEMV_MAX_CHUNKS chunks (gemv_chunks). Every chunk reads the whole weight (kernels.ops.linear sends it at most
    GEMV_SPLIT_ROWS rows). config: default_gemv's (DEFAULT_GEMV up to 8 rows, DEFAULT_GEMV_WIDE beyond); a batch of
    at most 8 rows takes one tile whatever config says. `out`, if given, is the [rows, O] result buffer."""
    out_features, in_features = qw.shape
    if x.dtype not in HALF_DTYPES or x.shape[-1] != in_features:
        raise TiermemError(
            f"quant_linear: x must be fp16/bf16 [..., {in_features}], got {x.dtype} {tuple(x.shape)}"
        )
    batch = x.numel() // in_features if in_features else 0  # the kernel reads x as [B, I]
    if not 1 <= batch <= GEMV_MAX_BATCH * GEMV_MAX_CHUNKS or not gemv_supported(qw):
        raise TiermemError(f"quant_linear: unsupported batch {batch} or weight layout {qw.shape}")
    if not (x.is_contiguous() and _aligned(x)):
        x = x.clone(memory_format=torch.contiguous_format)  # fresh, so 16-byte aligned
    if bias is not None:
        bias = (bias if bias.dtype == x.dtype else bias.to(x.dtype)).contiguous()
    scale, zero = qw.scale.contiguous(), qw.zero.contiguous()
    _check_cuda("quant_linear", x, qw.qdata, scale, zero, *(() if bias is None else (bias,)))
    config = config or default_gemv(batch)
    kernel, rows_per_block, shift = gemv_launch_plan(qw, x.dtype, config, batch)
    if out is None:
        y = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)  # y: [..., O], as [B, O]
    else:
        y = _output("quant_linear", out, (batch, out_features), x)  # y: [B, O]
    args = (_ptr(qw.qdata), _ptr(scale), _ptr(zero), _ptr(x), _ptr(bias), _ptr(y),
            *_i32s(out_features, in_features, qw.scheme.group_size, batch, shift))
    grid = (math.ceil(out_features / rows_per_block), gemv_chunks(batch, config))  # (row blocks, batch chunks)
    _launch(x.device, "gemv.cu", kernel, grid, 32 * config.warps, args,
            shared_mem=config.warps * (rows_per_block // 16) * batch_tiles(batch, config) * 128 * 4)
    return y if out is None else y.view(*x.shape[:-1], out_features)


def dequantize_cuda(qw: QuantizedWeight, dtype: torch.dtype = torch.float32,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """W[O, I] in dtype (fp16, bf16 or fp32), bit-identical to reference.dequantize."""
    out_features, in_features = qw.shape
    if dtype not in _DTYPE_NAMES:
        raise TiermemError(f"dequantize_cuda: dtype must be fp16, bf16 or fp32, got {dtype}")
    qdata, scale, zero = qw.qdata.contiguous(), qw.scale.contiguous(), qw.zero.contiguous()
    _check_cuda("dequantize_cuda", qdata, scale, zero)
    if qdata.numel() >= 2**32:
        raise TiermemError(f"dequantize_cuda: {qw.shape} has over 2**32 code bytes; split the weight")
    out = _output("dequantize_cuda", out, (out_features, in_features), qdata, dtype)
    row_bytes = qdata.shape[1]
    prefix = f"dequant_{qw.scheme.name}_{_DTYPE_NAMES[dtype]}"
    common = (_i32(in_features), _i32(qw.scheme.group_size))
    if row_bytes % 8 == 0 and _aligned(qdata, 8) and _aligned(out):
        units = out_features * row_bytes // 8
        args = (_ptr(qdata), _ptr(scale), _ptr(zero), _ptr(out), *common, np.uint32(row_bytes // 8),
                np.uint32(units))
        _launch(qdata.device, "dequant.cu", f"{prefix}_vec", _grid_for(units, 256), 256, args)
    else:
        total = out_features * row_bytes
        args = (_ptr(qdata), _ptr(scale), _ptr(zero), _ptr(out), *common, np.uint32(row_bytes),
                np.uint32(total))
        _launch(qdata.device, "dequant.cu", f"{prefix}_scalar", _grid_for(total, 256), 256, args)
    return out


# ---------------------------------------------------------------- routed GEMV over a mixture's experts


@dataclass(frozen=True)
class ExpertTable:
    """The weights of one routed GEMV launch (kernels/cuda/routed_gemv.cu): M matrices of each of E experts, all
    quantized alike and of one shape, as the device addresses the kernel reads."""

    pointers: torch.Tensor  # int64 [M, 3, E] on the GPU: codes, scales, zeros of matrix m of expert e
    shape: tuple[int, int]  # (O, I) of every weight
    bits: int
    group_size: int


# id(matrices[0][0]) -> (weak references to every weight of the table, the table or None where routed_supported
# said no). Decoded weights live as long as their tier and are asked for again at every step; an entry goes with its
# first weight (weakref.finalize).
_expert_tables: dict[int, tuple[tuple[weakref.ref, ...], ExpertTable | None]] = {}


def routed_supported(matrices: Sequence[Sequence[object]], device: torch.device) -> bool:
    """Whether the routed GEMV takes matrices[m][e]: quantized weights the fused GEMV takes, on `device`, of one
    shape and scheme, with contiguous scales and zeros."""
    first = matrices[0][0]
    if not isinstance(first, QuantizedWeight):
        return False
    return all(
        isinstance(w, QuantizedWeight) and w.shape == first.shape and w.scheme == first.scheme
        and w.qdata.device == device and gemv_supported(w) and w.scale.is_contiguous() and w.zero.is_contiguous()
        for row in matrices for w in row
    )


def expert_table(matrices: Sequence[Sequence[object]], device: torch.device, build: bool = True
                 ) -> ExpertTable | None:
    """The table of matrices[m][e] on `device`, or None where routed_supported says no; made once, then found again
    while the same weight objects are asked for (the check is made once too). None also where it is not made yet
    and build is False (a CUDA graph capture may not copy it to the GPU)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # as the weights' tensors name it
    flat = [w for row in matrices for w in row]
    key = id(flat[0])
    found = _expert_tables.get(key)
    if found is not None and len(found[0]) == len(flat) and all(r() is w for r, w in zip(found[0], flat, strict=True)):
        return found[1]
    if not build:
        return None
    table = None
    if routed_supported(matrices, device):
        first = flat[0]
        pointers = [[[w.qdata.data_ptr() for w in row], [w.scale.data_ptr() for w in row],
                     [w.zero.data_ptr() for w in row]] for row in matrices]  # [M][3][E]
        table = ExpertTable(torch.tensor(pointers, dtype=torch.int64, device=device), first.shape,
                            first.scheme.bits, first.scheme.group_size)
    _expert_tables[key] = (tuple(weakref.ref(w) for w in flat), table)
    weakref.finalize(flat[0], _expert_tables.pop, key, None)
    return table


def routed_quant_linear(x: torch.Tensor, table: ExpertTable, experts: torch.Tensor, x_div: int, rows: int = 1,
                        config: GemvConfig | None = None) -> torch.Tensor:
    """y [M, P * rows, O]: y[m, p * rows + r] = x[(p // x_div) * rows + r] @ dequant(W[m][experts[p]])^T in one
    launch, for x [P / x_div * rows, I] fp16/bf16 and experts int64 [P] on the GPU (read there: any routing, the
    same launch). rows: the rows each pick takes (1: a token's pick; the step's rows: an expert over all of them).
    config: default_gemv(rows)'s when None; its batch tiles apply to each pick's rows."""
    out_features, in_features = table.shape
    picks = experts.numel()
    blocks = picks // x_div if x_div > 0 else 0  # of `rows` rows of x
    if x.dtype not in HALF_DTYPES or x.dim() != 2 or x.shape[1] != in_features or rows < 1 \
            or x.shape[0] != blocks * rows or blocks * x_div != picks:
        raise TiermemError(f"routed_quant_linear: x must be fp16/bf16 [{blocks} * {rows}, {in_features}] for "
                           f"{picks} picks of {rows} rows, {x_div} per block of rows; got {x.dtype} {tuple(x.shape)}")
    config = config or default_gemv(rows)
    chunks = gemv_chunks(rows, config)
    if experts.dtype != torch.int64 or not 1 <= picks * chunks <= GEMV_MAX_CHUNKS:
        raise TiermemError(f"routed_quant_linear: experts must be int64 [1..{GEMV_MAX_CHUNKS // chunks}], got "
                           f"{experts.dtype} {tuple(experts.shape)}")
    x, experts = x.contiguous(), experts.contiguous()
    _check_cuda("routed_quant_linear", x, experts, table.pointers)
    tiles = batch_tiles(rows, config)
    kernel, rows_per_block, shift = _gemv_plan(table.bits, table.group_size, x.dtype, config.unroll,
                                               config.m_tiles, tiles)
    matrices, _, num_experts = table.pointers.shape
    y = torch.empty((matrices, picks * rows, out_features), dtype=x.dtype, device=x.device)
    args = (_ptr(table.pointers), _ptr(experts), *_i32s(num_experts), _ptr(x), _ptr(y),
            *_i32s(out_features, in_features, table.group_size, picks, x_div, rows, shift))
    grid = (math.ceil(out_features / rows_per_block), picks * chunks, matrices)
    _launch(x.device, "routed_gemv.cu", kernel.replace("quant_gemv", "routed_gemv", 1), grid, 32 * config.warps,
            args, shared_mem=config.warps * (rows_per_block // 16) * tiles * 128 * 4)
    return y


# ---------------------------------------------------------------- fused elementwise kernels


def rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """reference.rms_norm for fp16/bf16 x[..., D] and a fp16/bf16/fp32 weight[D]."""
    dim = x.shape[-1]
    x = x.contiguous()
    weight = weight.contiguous()
    _check_cuda("rms_norm_cuda", x, weight)
    out = _output("rms_norm_cuda", out, tuple(x.shape), x)
    rows = x.numel() // dim if dim else 0
    if rows == 0:
        return out
    vec = 8 if dim % 8 == 0 and _aligned(x) and _aligned(weight) and _aligned(out) else 1
    threads = min(1024, max(32, 32 * math.ceil(dim / vec / 32)))
    kernel = f"rms_norm_{_DTYPE_NAMES[x.dtype]}_w{_DTYPE_NAMES[weight.dtype]}_vec{vec}"
    args = (_ptr(x), _ptr(weight), _ptr(out), _i32(dim), np.float32(eps))
    _launch(x.device, "elementwise.cu", kernel, rows, threads, args)
    return out


def apply_rope_cuda(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """reference.apply_rope: x[B, H, T, Dh] (any strides, last one 1), cos/sin[B or 1, T, Dh]."""
    batch, heads, seq, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    _check_cuda("apply_rope_cuda", x, cos, sin)
    out = _output("apply_rope_cuda", out, (batch, heads, seq, head_dim), x)
    total = batch * heads * seq * (head_dim // 2)
    if total == 0:
        return out

    def bstride(t: torch.Tensor) -> int:
        return 0 if t.shape[0] == 1 else t.stride(0)

    args = (_ptr(x), _ptr(cos), _ptr(sin), _ptr(out), _i32(heads), _i32(seq), _i32(head_dim // 2),
            np.int64(x.stride(0)), np.int64(x.stride(1)), np.int64(x.stride(2)), np.int64(bstride(cos)),
            np.int64(cos.stride(1)), np.int64(bstride(sin)), np.int64(sin.stride(1)), np.uint32(total))
    kernel = f"rope_{_DTYPE_NAMES[x.dtype]}_c{_DTYPE_NAMES[cos.dtype]}"
    _launch(x.device, "elementwise.cu", kernel, _grid_for(total, 256), 256, args)
    return out


def silu_mul_cuda(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """reference.silu_mul for fp16/bf16 tensors of one shape."""
    gate, up = gate.contiguous(), up.contiguous()
    _check_cuda("silu_mul_cuda", gate, up)
    out = _output("silu_mul_cuda", out, tuple(gate.shape), gate)
    n = gate.numel()
    if n == 0:
        return out
    vec = 8 if _aligned(gate) and _aligned(up) and _aligned(out) else 1
    kernel = f"silu_mul_{_DTYPE_NAMES[gate.dtype]}_vec{vec}"
    args = (_ptr(gate), _ptr(up), _ptr(out), np.uint64(n))
    _launch(gate.device, "elementwise.cu", kernel, _grid_for(n // vec if vec == 8 else n, 256), 256, args)
    return out


# ---------------------------------------------------------------- attention over a quantized KV cache

KV_ATTENTION_THREADS = 128  # kv_attention.cu's block size
KV_ATTENTION_MAX_HEAD_DIM = 256
KV_ATTENTION_MAX_QUERIES_PER_KV_HEAD = 16  # its register accumulators
KV_ATTENTION_SHARED_FLOATS = 12288  # 48 KiB: queries [H/Hkv, Dh] and scores [H/Hkv, chunk] of one block
KV_ATTENTION_MIN_CHUNK = 64  # slots per block below which more splits only add combine work
# The blocks kv_attention_splits aims for on each SM. Swept by benchmarks/bench_kernels.py on the H200 (session 11,
# benchmarks/results/kv_attention_splits_s11call1_h200.json): 4 against 2 took llama3-8b's b16 x 2304 graph span
# from 173 to 138 us (int4) and 209 to 148 us (int8), b8 x 4096 from 242 to 165 / 292 to 190 us; it lost 10% where
# 512 rows x kv heads already fill the GPU (111B b64 x 518: 235 to 260 us, a disk-bound step's 0.3%); 8 and 16 were
# slower than 4 except at b64 x 2048.
KV_ATTENTION_BLOCKS_PER_SM = 4


def _check_slot(fn: str, name: str, slot: torch.Tensor | None) -> None:
    """A slot held in device memory for a kernel to read: int64 [1] (or None: none given)."""
    if slot is not None and (slot.dtype != torch.int64 or slot.shape != (1,)):
        raise TiermemError(f"{fn}: {name} must be int64 [1], got {slot.dtype} {tuple(slot.shape)}")


def kv_attention_supported(heads: int, kv_heads: int, head_dim: int, bits: int, group: int) -> bool:
    """Whether kv_attention_cuda takes these shapes (kv_attention.cu's limits)."""
    return (bits in (4, 8) and heads % kv_heads == 0 and heads // kv_heads <= KV_ATTENTION_MAX_QUERIES_PER_KV_HEAD
            and head_dim % 8 == 0 and head_dim <= KV_ATTENTION_MAX_HEAD_DIM and group % 8 == 0
            and head_dim % group == 0)


def kv_attention_splits(batch: int, heads: int, kv_heads: int, head_dim: int, length: int,
                        sm_count: int) -> tuple[int, int]:
    """(splits, chunk): the sequence split into `splits` chunks of `chunk` slots (the last may be shorter), enough
    blocks (splits x kv heads x rows) for KV_ATTENTION_BLOCKS_PER_SM on every SM while a chunk's scores fit shared
    memory."""
    qpk = heads // kv_heads
    max_chunk = KV_ATTENTION_SHARED_FLOATS // qpk - head_dim
    wanted = math.ceil(KV_ATTENTION_BLOCKS_PER_SM * sm_count / (batch * kv_heads))
    splits = max(math.ceil(length / max_chunk), min(wanted, math.ceil(length / KV_ATTENTION_MIN_CHUNK)), 1)
    chunk = math.ceil(length / splits)
    return math.ceil(length / chunk), chunk


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def kv_attention_cuda(q: torch.Tensor, k: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                      v: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bits: int, group: int,
                      key_mask: torch.Tensor, length: int, window: int | None, softmax_scale: float,
                      query_slot: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of q [b, H, Dh] over slots 0..length-1 of a quantized K / V, dequantized in the kernel.

    k, v: (codes uint8 [b, Hkv, S_max, Dh*bits/8], scale, zero fp16 [b, Hkv, S_max, Dh/group]), contiguous;
    key_mask: bool [b, >= length] (row stride free); the query is slot length-1, or the one in query_slot (int64
    [1] on the device, < length: read when the kernel runs, as a CUDA graph's replays need; see kv_attention.cu).
    The sequence is split (kv_attention_splits); per split, fp32 partial outputs [splits, b, H, Dh] and
    (max, sum) [splits, b, H, 2] are merged by a second kernel. Returns [b, H, Dh] in q's dtype.
    """
    b, heads, head_dim = q.shape
    codes = k[0]
    _, kv_heads, s_max, code_bytes = codes.shape
    if (not kv_attention_supported(heads, kv_heads, head_dim, bits, group) or code_bytes * 8 != head_dim * bits
            or not 1 <= length <= s_max or q.dtype not in _DTYPE_NAMES):
        raise TiermemError(f"kv_attention_cuda: unsupported q {tuple(q.shape)} {q.dtype}, KV {tuple(codes.shape)} "
                           f"int{bits} group {group}, length {length}")
    _check_slot("kv_attention_cuda", "query_slot", query_slot)
    parts = (*k, *v)
    word = 8 if bits == 8 else 4  # the kernel reads codes 8 / 4 bytes at a time, scales and zeros as fp16
    if not all(t.is_contiguous() and t.shape[:3] == codes.shape[:3] and _aligned(t, word if t.dtype == torch.uint8
                                                                              else 2) for t in parts):
        raise TiermemError(f"kv_attention_cuda: K and V codes, scales and zeros must be contiguous [b, Hkv, S_max, *], "
                           f"codes {word}-byte aligned")
    q = q.contiguous()
    mask = key_mask.view(torch.uint8)
    _check_cuda("kv_attention_cuda", q, mask, *parts, *([] if query_slot is None else [query_slot]))
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    splits, chunk = kv_attention_splits(b, heads, kv_heads, head_dim, length, _sm_count(index))
    part_out = torch.empty(splits, b, heads, head_dim, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(splits, b, heads, 2, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    args = (_ptr(q), *(_ptr(t) for t in parts), _ptr(mask), _ptr(query_slot), _ptr(part_out), _ptr(part_ml),
            _i32(b), _i32(heads), _i32(kv_heads), _i32(s_max), _i32(length), _i32(head_dim), _i32(group),
            _i32(mask.stride(0)), _i32(window or 0), np.float32(softmax_scale), _i32(chunk))
    dtype = _DTYPE_NAMES[q.dtype]
    shared = 4 * (heads // kv_heads) * (head_dim + chunk)
    _launch(q.device, "kv_attention.cu", f"kv_attention_int{bits}_{dtype}", (splits, kv_heads, b),
            KV_ATTENTION_THREADS, args, shared_mem=shared)
    _launch(q.device, "kv_attention.cu", f"kv_attention_combine_{dtype}", b * heads, KV_ATTENTION_THREADS,
            (_ptr(part_out), _ptr(part_ml), _ptr(out), _i32(b * heads), _i32(head_dim), _i32(splits)))
    return out


# ---------------------------------------------------------------- quantizing new tokens into a KV cache


def kv_quantize_cuda(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                     group: int, row0: int, start: int, start_slot: torch.Tensor | None = None) -> None:
    """Quantize x [rows, Hkv, T, Dh] (any strides) into batch rows row0.. and slots start..start+T-1 of codes
    uint8 [B, Hkv, S_max, Dh*bits/8] and scale / zero fp16 [B, Hkv, S_max, Dh/group] (contiguous), bit for bit
    as tiermem.kernels.kv_quant.quantize_kv (kv_quant.cu). start_slot (int64 [1] on the device): start read from
    it when the kernel runs (a graph step's slot; a slot > S_max - T writes nothing), `start` then unused."""
    _check_slot("kv_quantize_cuda", "start_slot", start_slot)
    rows, kv_heads, tokens, head_dim = x.shape
    batch, _, s_max, _ = codes.shape
    if (bits not in (4, 8) or head_dim % group or (bits == 4 and group % 2) or x.dtype not in _DTYPE_NAMES
            or codes.shape != (batch, kv_heads, s_max, head_dim * bits // 8)
            or not scale.shape == zero.shape == (batch, kv_heads, s_max, head_dim // group)
            or not all(t.is_contiguous() for t in (codes, scale, zero))
            or row0 < 0 or row0 + rows > batch or start < 0 or start + tokens > s_max):
        raise TiermemError(f"kv_quantize_cuda: x {tuple(x.shape)} does not go into int{bits} group {group} KV "
                           f"{tuple(codes.shape)} at rows {row0}.., slots {start}..")
    _check_cuda("kv_quantize_cuda", x, codes, scale, zero, *([] if start_slot is None else [start_slot]))
    work = rows * kv_heads * tokens * (head_dim // group)
    if work == 0:
        return
    args = (_ptr(x), *(np.int64(st) for st in x.stride()), _ptr(codes), _ptr(scale), _ptr(zero), _i32(rows),
            _i32(kv_heads), _i32(tokens), _i32(head_dim), _i32(group), _i32(s_max), _i32(row0), _i32(start),
            _ptr(start_slot))
    _launch(x.device, "kv_quant.cu", f"kv_quantize_int{bits}_{_DTYPE_NAMES[x.dtype]}", _grid_for(work, 128), 128, args)

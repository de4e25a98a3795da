"""Benchmark of tiermem's CUDA kernels against the HBM roofline measured in the same run.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels.json

1. HBM bandwidth: a large device-to-device copy (bytes read + bytes written) / time.
2. Fused int4/int8 dequant-GEMV at 28672 x 8192 and 8192 x 28672 (--gemv-shape), batch 1, 4, 8, 16
   (--gemv-batch), every launch variant (beyond 8 rows also with two 8-row tiles per block): achieved
   bandwidth = bytes of qdata + scale + zero + x + y / time, and its fraction of (1); the dense fp16 GEMV
   through torch (cuBLAS) as a reference point.
   Routed GEMV (kernels/cuda/routed_gemv.cu) over 8 experts of --routed-shape (OUTxINxM: M matrices per launch,
   Mixtral's gate and up, then down), 1-6 picks, every launch variant: bytes = the picked experts' weights + x + y.
3. Dequantization to a dense fp16 matrix (bytes read + written / time).
4. Fused RMSNorm, RoPE and SiLU*mul against the torch reference ops.
5. Decode attention over an int4/int8 KV cache: the fused kernel (K, V dequantized inside it) against what
   it replaces, dequantize_kv then SDPA (kv heads folded, engine.attention's way); bytes = quantized K and V.

Timing: CUDA events around each launch, all launches queued behind a GPU sleep so that Python's launch
overhead stays outside the events; the median over many launches, rotating over enough weight copies
that the L2 cache cannot hold them. Writes every number to --out as JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from tiermem.kernels import cupy_ops, reference
from tiermem.kernels.quant import QuantizedWeight, QuantScheme, quantize

SECTIONS = ("gemv", "routed", "dequant", "elementwise", "kv_attention")
SLEEP_CYCLES = 20_000_000  # ~10 ms at 2 GHz: covers the enqueue time of one batch of launches


def time_launches(fns: list[Callable[[], object]], reps: int) -> float:
    """Median seconds of one call, over `reps` calls cycling through `fns` (warmed up first)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    batch = 25
    while len(times) < reps:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(batch)]
        torch.cuda._sleep(SLEEP_CYCLES)
        for i, (start, end) in enumerate(events):
            start.record()
            fns[(len(times) + i) % len(fns)]()
            end.record()
        torch.cuda.synchronize()
        times += [start.elapsed_time(end) / 1e3 for start, end in events]
    return statistics.median(times[:reps])


def hbm_bandwidth(nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    seconds = time_launches([lambda: dst.copy_(src)], reps)
    return 2 * nbytes / seconds


def weight_copies(out_features: int, in_features: int, bits: int, group: int,
                  l2_bytes: int) -> list[QuantizedWeight]:
    """Distinct quantized weights, enough that together they exceed 4x the L2 cache."""
    w = torch.randn(out_features, in_features, device="cuda") * 0.02
    first = quantize(w, QuantScheme(bits, group))
    del w
    count = max(2, -(-4 * l2_bytes // first.nbytes))
    copies = [first]
    for _ in range(count - 1):
        copies.append(QuantizedWeight(first.qdata.clone(), first.scale.clone(), first.zero.clone(),
                                      first.scheme, first.shape))
    return copies


GEMV_CONFIGS = cupy_ops.GEMV_VARIANTS + (cupy_ops.GemvConfig(2, 1, 4), cupy_ops.GemvConfig(4, 1, 4))


def gemv_configs(batch: int) -> tuple[cupy_ops.GemvConfig, ...]:
    """The launch variants timed at `batch` rows: GEMV_CONFIGS, and beyond 8 rows each with two batch tiles too."""
    if batch <= cupy_ops.GEMV_MAX_BATCH:
        return GEMV_CONFIGS
    return GEMV_CONFIGS + tuple(replace(c, batch_tiles=2) for c in GEMV_CONFIGS)


def bench_gemv_case(copies: list[QuantizedWeight], batch: int, dtype: torch.dtype, reps: int,
                    hbm: float) -> list[dict]:
    """Every launch variant of the fused GEMV on one weight shape, batch and dtype."""
    out_features, in_features = copies[0].shape
    x = torch.randn(batch, in_features, device="cuda").to(dtype)
    ref = reference.linear(x, cupy_ops.dequantize_cuda(copies[0], dtype)).float()
    rows = []
    for config in gemv_configs(batch):
        outs = [torch.empty(batch, out_features, dtype=dtype, device="cuda") for _ in copies]
        fns = [(lambda q=q, o=o, c=config: cupy_ops.quant_linear(x, q, None, config=c, out=o))
               for q, o in zip(copies, outs, strict=True)]
        seconds = time_launches(fns, reps)
        got = outs[0].float()
        moved = copies[0].nbytes + x.numel() * x.element_size() + outs[0].numel() * 2
        rows.append({
            "kernel": "gemv", "bits": copies[0].scheme.bits, "dtype": str(dtype).removeprefix("torch."),
            "out": out_features, "in": in_features, "batch": batch,
            "variant": f"u{config.unroll}m{config.m_tiles}w{config.warps}n{cupy_ops.batch_tiles(batch, config)}",
            "name": cupy_ops.gemv_launch_plan(copies[0], dtype, config, batch)[0],
            "default": config == (cupy_ops.DEFAULT_GEMV if batch <= cupy_ops.GEMV_MAX_BATCH
                                  else cupy_ops.DEFAULT_GEMV_WIDE),
            "us": seconds * 1e6, "bytes": moved, "gbps": moved / seconds / 1e9,
            "fraction_of_hbm": moved / seconds / hbm,
            "rel_err_vs_dequant_matmul": ((got - ref).norm() / ref.norm()).item(),
        })
    return rows


def bench_gemv(args, l2_bytes: int, hbm: float) -> list[dict]:
    rows = []
    for out_features, in_features in (tuple(int(n) for n in shape.split("x")) for shape in args.gemv_shape):
        for bits in (4, 8):
            copies = weight_copies(out_features, in_features, bits, args.group, l2_bytes)
            for dtype in (torch.float16, torch.bfloat16):
                for batch in args.gemv_batch:
                    rows += bench_gemv_case(copies, batch, dtype, args.reps, hbm)
            del copies
            torch.cuda.empty_cache()
    # Dense fp16 GEMV through cuBLAS: the bandwidth torch reaches on 2-byte weights.
    for out_features, in_features in ((28672, 8192), (8192, 28672)):
        dense = [torch.randn(out_features, in_features, device="cuda", dtype=torch.float16)
                 for _ in range(max(2, -(-4 * l2_bytes // (out_features * in_features * 2))))]
        x = torch.randn(1, in_features, device="cuda", dtype=torch.float16)
        fns = [(lambda w=w, x=x: torch.nn.functional.linear(x, w)) for w in dense]
        seconds = time_launches(fns, args.reps)
        moved = out_features * in_features * 2
        rows.append({"kernel": "torch_dense_fp16_gemv", "bits": 16, "dtype": "float16", "out": out_features,
                     "in": in_features, "batch": 1, "variant": "cublas", "name": "F.linear",
                     "us": seconds * 1e6, "bytes": moved, "gbps": moved / seconds / 1e9,
                     "fraction_of_hbm": moved / seconds / hbm})
        del dense
        torch.cuda.empty_cache()
    return rows


def bench_routed(args, hbm: float) -> list[dict]:
    """Every launch variant of the routed GEMV at each --routed-shape, bf16, for 1, 2, 4 and 6 picks of 8 experts
    (distinct picks per launch, cycling over the experts so that the L2 cache does not hold them)."""
    rows = []
    for shape in args.routed_shape:
        out_features, in_features, matrices = (int(n) for n in shape.split("x"))
        experts = 8
        weights = [[quantize(torch.randn(out_features, in_features, device="cuda") * 0.02, QuantScheme(4, args.group))
                    for _ in range(experts)] for _ in range(matrices)]
        table = cupy_ops.expert_table(weights, torch.device("cuda"))
        for picks in (1, 2, 4, 6):
            x = torch.randn(picks if matrices == 1 else 1, in_features, device="cuda").to(torch.bfloat16)
            x_div = 1 if matrices == 1 else picks
            choices = [torch.tensor([(start + j) % experts for j in range(picks)], device="cuda")
                       for start in range(0, experts, max(1, picks))]
            for config in GEMV_CONFIGS:
                fns = [(lambda e=e, c=config, x=x, t=table, d=x_div: cupy_ops.routed_quant_linear(x, t, e, d, config=c))
                       for e in choices]
                seconds = time_launches(fns, args.reps)
                moved = matrices * picks * weights[0][0].nbytes + x.numel() * 2 + matrices * picks * out_features * 2
                rows.append({
                    "kernel": "routed_gemv", "bits": 4, "dtype": "bfloat16", "out": out_features, "in": in_features,
                    "matrices": matrices, "picks": picks,
                    "variant": f"u{config.unroll}m{config.m_tiles}w{config.warps}",
                    "default": config == cupy_ops.DEFAULT_GEMV, "us": seconds * 1e6, "bytes": moved,
                    "gbps": moved / seconds / 1e9, "fraction_of_hbm": moved / seconds / hbm,
                })
        del weights, table
        torch.cuda.empty_cache()
    return rows


def bench_dequant(args, l2_bytes: int, hbm: float) -> list[dict]:
    rows = []
    for bits in (4, 8):
        copies = weight_copies(28672, 8192, bits, args.group, l2_bytes)[:3]
        outs = [torch.empty(28672, 8192, dtype=torch.float16, device="cuda") for _ in copies]
        seconds = time_launches(
            [(lambda q=q, o=o: cupy_ops.dequantize_cuda(q, torch.float16, out=o))
             for q, o in zip(copies, outs, strict=True)],
            args.reps,
        )
        moved = copies[0].nbytes + outs[0].numel() * 2
        rows.append({"kernel": "dequant_fp16", "bits": bits, "out": 28672, "in": 8192, "us": seconds * 1e6,
                     "bytes": moved, "gbps": moved / seconds / 1e9, "fraction_of_hbm": moved / seconds / hbm})
        del copies, outs
        torch.cuda.empty_cache()
    return rows


def bench_elementwise(args, hbm: float) -> list[dict]:
    rows = []
    dtype = torch.bfloat16

    def add(name: str, shape: tuple, moved: int, fused: Callable, torch_ref: Callable) -> None:
        t_fused = time_launches([fused], args.reps)
        t_torch = time_launches([torch_ref], args.reps)
        rows.append({"kernel": name, "shape": list(shape), "us": t_fused * 1e6, "torch_us": t_torch * 1e6,
                     "speedup": t_torch / t_fused, "bytes": moved, "gbps": moved / t_fused / 1e9,
                     "fraction_of_hbm": moved / t_fused / hbm})

    for shape in ((8, 8192), (16384, 8192)):
        x = torch.randn(shape, device="cuda").to(dtype)
        w = torch.randn(shape[-1], device="cuda").to(dtype)
        add("rms_norm", shape, 2 * x.numel() * 2, lambda x=x, w=w: cupy_ops.rms_norm_cuda(x, w, 1e-6),
            lambda x=x, w=w: reference.rms_norm(x, w, 1e-6))
    for shape in ((8, 32, 1, 128), (1, 32, 8192, 128)):
        x = torch.randn(shape, device="cuda").to(dtype)
        cos = torch.randn(shape[0], shape[2], shape[3], device="cuda").to(dtype)
        sin = torch.randn_like(cos)
        moved = 2 * x.numel() * 2 + 2 * cos.numel() * 2
        add("rope", shape, moved, lambda x=x, c=cos, s=sin: cupy_ops.apply_rope_cuda(x, c, s),
            lambda x=x, c=cos, s=sin: reference.apply_rope(x, c, s))
    for shape in ((8, 28672), (16384, 28672)):
        gate, up = torch.randn(shape, device="cuda").to(dtype), torch.randn(shape, device="cuda").to(dtype)
        add("silu_mul", shape, 3 * gate.numel() * 2, lambda g=gate, u=up: cupy_ops.silu_mul_cuda(g, u),
            lambda g=gate, u=up: reference.silu_mul(g, u))
    return rows


KV_ATTENTION_SHAPES = [  # batch, heads, kv heads, head dim, filled slots
    (16, 32, 8, 128, 2304),  # llama3-8b at batch 16 x 2048, a CUDA graph's span
    (64, 96, 8, 128, 518),  # the 111B (b) run's decode step
    (64, 96, 8, 128, 2048),
    (8, 64, 8, 128, 4096),
    (1, 32, 8, 128, 4096),
]


def bench_kv_attention(args, hbm: float) -> list[dict]:
    import torch.nn.functional as F

    from tiermem.engine.attention import Attention
    from tiermem.kernels.kv_quant import dequantize_kv, quantize_kv

    rows = []
    dtype = torch.bfloat16
    for b, heads, kv_heads, dh, length in KV_ATTENTION_SHAPES:
        for bits in (4, 8):
            scheme = QuantScheme(bits, 128)
            k = quantize_kv(torch.randn(b, kv_heads, length, dh, device="cuda"), scheme)  # (codes, scale, zero)
            v = quantize_kv(torch.randn(b, kv_heads, length, dh, device="cuda"), scheme)
            q = torch.randn(b, heads, 1, dh, device="cuda", dtype=dtype)
            key_mask = torch.ones(b, length, dtype=torch.bool, device="cuda")
            attn = Attention(key_mask, length - 1, slice(0, b))
            group = heads // kv_heads

            def fused(q=q, k=k, v=v, key_mask=key_mask, length=length, dh=dh, bits=bits):
                return cupy_ops.kv_attention_cuda(q[:, :, 0], k, v, bits, 128, key_mask, length, None, dh**-0.5)

            def unfused(q=q, k=k, v=v, attn=attn, b=b, kv_heads=kv_heads, group=group, dh=dh, scheme=scheme):
                kd = dequantize_kv(*k, scheme, dtype)  # [b, Hkv, S, Dh]
                vd = dequantize_kv(*v, scheme, dtype)
                return F.scaled_dot_product_attention(q.reshape(b, kv_heads, group, dh), kd, vd,
                                                      attn_mask=attn.grouped_mask(None, group), scale=dh**-0.5)

            t_unfused = time_launches([unfused], args.reps)
            moved = sum(t.numel() * t.element_size() for t in (*k, *v))
            default = cupy_ops.KV_ATTENTION_BLOCKS_PER_SM
            for per_sm in sorted({default, *args.kv_blocks_per_sm}):  # how many blocks the sequence split aims for
                cupy_ops.KV_ATTENTION_BLOCKS_PER_SM = per_sm
                try:
                    t_fused = time_launches([fused], args.reps)
                    splits, _ = cupy_ops.kv_attention_splits(b, heads, kv_heads, dh, length,
                                                             torch.cuda.get_device_properties(0).multi_processor_count)
                finally:
                    cupy_ops.KV_ATTENTION_BLOCKS_PER_SM = default
                rows.append({"kernel": "kv_decode_attention", "bits": bits, "batch": b, "heads": heads,
                             "kv_heads": kv_heads, "head_dim": dh, "length": length, "blocks_per_sm": per_sm,
                             "default": per_sm == default, "splits": splits, "us": t_fused * 1e6,
                             "dequantize_sdpa_us": t_unfused * 1e6, "speedup": t_unfused / t_fused, "bytes": moved,
                             "gbps": moved / t_fused / 1e9, "fraction_of_hbm": moved / t_fused / hbm})
            del k, v
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--reps", type=int, default=100, help="timed launches per measurement")
    parser.add_argument("--group", type=int, default=64, help="quantization group size")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections (repeatable)")
    parser.add_argument("--gemv-shape", nargs="+", default=["28672x8192", "8192x28672"],
                        help="weight shapes OUTxIN of the GEMV section")
    parser.add_argument("--gemv-batch", type=int, nargs="+", default=[1, 4, 8, 16],
                        help="rows of x in the GEMV section")
    parser.add_argument("--routed-shape", nargs="+", default=["14336x4096x2", "4096x14336x1", "16384x6144x2",
                                                               "6144x16384x1"],
                        help="OUTxINxM of the routed GEMV section (Mixtral-8x7B's and 8x22B's experts)")
    parser.add_argument("--kv-blocks-per-sm", type=int, nargs="*", default=[],
                        help="also time the fused KV attention with the sequence split for these blocks per SM")
    args = parser.parse_args(argv)
    if not cupy_ops.cuda_kernels_available():
        print("needs a CUDA GPU (sm_80+) and CuPy", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20)
    hbm = hbm_bandwidth(2 * 2**30, args.reps // 4 + 5)
    result = {
        "device": props.name, "sms": props.multi_processor_count, "l2_bytes": l2_bytes,
        "torch": torch.__version__, "hbm_copy_gbps": hbm / 1e9, "group_size": args.group,
        "command": " ".join(["python", *sys.argv]),
    }
    sections = {"gemv": lambda: bench_gemv(args, l2_bytes, hbm),
                "routed": lambda: bench_routed(args, hbm),
                "dequant": lambda: bench_dequant(args, l2_bytes, hbm),
                "elementwise": lambda: bench_elementwise(args, hbm),
                "kv_attention": lambda: bench_kv_attention(args, hbm)}
    for name in args.only or SECTIONS:
        result[name] = sections[name]()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(f"{props.name}: HBM copy {hbm / 1e9:.0f} GB/s (read + write)")
    best: dict[tuple, dict] = {}
    for row in result.get("gemv", []):
        key = (row["kernel"], row["bits"], row["dtype"], row["out"], row["in"], row["batch"])
        if key not in best or row["us"] < best[key]["us"]:
            best[key] = row
    print(f"{'kernel':22s} {'bits':>4s} {'dtype':>8s} {'O x I':>12s} {'B':>2s} {'best variant':>12s} "
          f"{'us':>8s} {'GB/s':>7s} {'of HBM':>7s}")
    for row in best.values():
        print(f"{row['kernel']:22s} {row['bits']:4d} {row['dtype']:>8s} {row['out']:>6d}x{row['in']:<5d} "
              f"{row['batch']:2d} {row['variant']:>12s} {row['us']:8.1f} {row['gbps']:7.0f} "
              f"{row['fraction_of_hbm']:7.1%}")
    for row in result.get("routed", []):
        print(f"routed int4 bf16 {row['out']}x{row['in']} x{row['matrices']} {row['picks']} picks {row['variant']:>8s}"
              f"{' (default)' if row['default'] else ''}: {row['us']:8.1f} us, {row['gbps']:5.0f} GB/s, "
              f"{row['fraction_of_hbm']:.1%} of HBM")
    for row in result.get("dequant", []):
        print(f"dequant int{row['bits']} -> fp16 28672x8192: {row['us']:.1f} us, {row['gbps']:.0f} GB/s, "
              f"{row['fraction_of_hbm']:.1%} of HBM")
    for row in result.get("elementwise", []):
        print(f"{row['kernel']:9s} {str(tuple(row['shape'])):22s} {row['us']:8.1f} us "
              f"(torch {row['torch_us']:8.1f}), x{row['speedup']:.2f}, {row['fraction_of_hbm']:.1%} of HBM")
    for row in result.get("kv_attention", []):
        print(f"kv attention int{row['bits']} b{row['batch']} H{row['heads']}/{row['kv_heads']} S{row['length']} "
              f"{row['splits']} splits ({row['blocks_per_sm']} blocks/SM{', default' if row['default'] else ''}): "
              f"{row['us']:8.1f} us (dequantize + SDPA {row['dequantize_sdpa_us']:8.1f}), x{row['speedup']:.2f}, "
              f"{row['fraction_of_hbm']:.1%} of HBM")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

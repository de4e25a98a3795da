"""CPU checks of the kernel layer: dispatch falls back to the reference, cupy_ops imports without CuPy,
the .cu sources compile cleanly with nvcc, and a lane-level model of the GEMV matches the reference."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from gemv_simulation import simulate_gemv

from tiermem.errors import TiermemError
from tiermem.kernels import cupy_ops, ops, reference
from tiermem.kernels.quant import QuantScheme, quantize


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_on_cpu_are_the_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 128, generator=gen).to(dtype)
    w = torch.randn(40, 128, generator=gen)
    bias = torch.randn(40, generator=gen)
    qw = quantize(w, QuantScheme(4, 64))
    assert torch.equal(ops.linear(x, qw, bias), reference.linear(x, qw, bias))
    assert torch.equal(ops.linear(x, w.to(dtype), None), reference.linear(x, w.to(dtype), None))
    assert torch.equal(ops.dequantize(qw, dtype), reference.dequantize(qw, dtype))
    norm_w = torch.randn(128, generator=gen).to(dtype)
    assert torch.equal(ops.rms_norm(x, norm_w, 1e-6), reference.rms_norm(x, norm_w, 1e-6))
    q = torch.randn(2, 4, 6, 16, generator=gen).to(dtype)
    cos, sin = torch.randn(2, 6, 16, generator=gen), torch.randn(2, 6, 16, generator=gen)
    assert torch.equal(ops.apply_rope(q, cos, sin), reference.apply_rope(q, cos, sin))
    gate, up = torch.randn(4, 32, generator=gen).to(dtype), torch.randn(4, 32, generator=gen).to(dtype)
    assert torch.equal(ops.silu_mul(gate, up), reference.silu_mul(gate, up))


def test_cupy_ops_imports_without_cupy():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'cupy' or name.startswith('cupy.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from tiermem.kernels import cupy_ops, ops\n"
        "assert cupy_ops.cuda_kernels_available() is False\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


PLAN_CONFIG = cupy_ops.GemvConfig(2, 1, 8)


def test_gemv_kernel_choice():
    def choose(bits, group, dtype=torch.float16, config=PLAN_CONFIG, in_features=384):
        qw = quantize(torch.randn(32, in_features), QuantScheme(bits, group))
        return cupy_ops.gemv_launch_plan(qw, dtype, config)

    assert choose(4, 64) == ("quant_gemv_int4_f16_u2m1", 16, 1)
    assert choose(4, 32, torch.bfloat16) == ("quant_gemv_int4_bf16_u1m1", 16, 0)  # a chunk per group
    assert choose(8, 128, config=cupy_ops.GemvConfig(2, 2, 8)) == ("quant_gemv_int8_f16_u2m2", 32, 3)
    assert choose(4, 16)[0] == "quant_gemv_int4_f16_general"  # groups smaller than a chunk
    assert choose(4, 96)[0] == "quant_gemv_int4_f16_general"  # 3 chunks per group: not a power of two


SIM_CASES = [
    # bits, group, dtype, unroll, m_tiles, general
    (4, 64, torch.float16, 2, 1, False),
    (4, 64, torch.bfloat16, 2, 1, False),
    (4, 128, torch.float16, 4, 1, False),
    (4, 64, torch.float16, 1, 2, False),
    (8, 64, torch.float16, 2, 2, False),
    (8, 64, torch.bfloat16, 1, 1, False),
    (4, 6, torch.float16, 1, 1, True),
    (8, 10, torch.bfloat16, 1, 1, True),
]


# rows in 8-row tiles, batch tiles per block: one tile; two, the second partial; two full; two in one block; a full
# block and a partial one
@pytest.mark.parametrize(("rows", "batch_tiles"), [(3, 1), (13, 1), (16, 1), (16, 2), (21, 2)])
@pytest.mark.parametrize(("bits", "group", "dtype", "unroll", "m_tiles", "general"), SIM_CASES)
def test_gemv_lane_model_matches_reference(bits, group, dtype, unroll, m_tiles, general, rows, batch_tiles):
    gen = torch.Generator().manual_seed(bits * 1000 + group + rows)
    # An odd number of groups, and (fast path) a row that ends in the middle of a warp step.
    in_features = 3 * math.lcm(128 // bits, group) if general else 7 * group
    out_features = 20  # not a multiple of 16
    w = torch.randn(out_features, in_features, generator=gen) * 0.05
    qw = quantize(w, QuantScheme(bits, group))
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    bias = torch.randn(out_features, generator=gen).to(dtype)
    y = simulate_gemv(qw, x, bias, unroll=unroll, m_tiles=m_tiles, warps=4, general=general, batch_tiles=batch_tiles)
    assert not torch.isnan(y).any()  # every output written
    ref = x.double() @ reference.dequantize(qw, torch.float64).T + bias.double()
    assert _rel_err(y, ref) < (2e-3 if dtype == torch.float16 else 1e-2)


def _kernel_params(source: str) -> list[str]:
    """The parameters of a .cu file's kernels (the NAME(...) of its kernel macro), e.g. 'const uint4* __restrict__
    qdata', 'int O'."""
    text = (cupy_ops.CUDA_DIR / source).read_text()
    params = re.search(r"\bNAME\(([^)]*)\)", text).group(1)
    return [" ".join(p.replace("\\", " ").split()) for p in params.split(",")]


def _check_argument_types(params: list[str], kernel_args: tuple) -> None:
    """Each launch argument typed as its kernel parameter: pointers as 8-byte ints (Python int), `int` as np.int32."""
    assert len(kernel_args) == len(params)
    for param, arg in zip(params, kernel_args, strict=True):
        if "*" in param:
            assert type(arg) is int and 0 < arg < 2**63, (param, arg)
        else:
            assert param.startswith("int ") and type(arg) is np.int32, (param, arg)


@pytest.mark.parametrize("rows", [1, 8, 9, 13, 16, 17])
def test_quant_linear_launches_once_with_the_kernels_argument_types(rows, monkeypatch):
    """quant_linear's launch, recorded instead of run (no GPU here): one launch for any row count, grid (row
    blocks, 8-row chunks), and arguments typed as gemv.cu's parameters: pointers as 8-byte ints (Python int),
    `int` as np.int32."""
    launches = []
    monkeypatch.setattr(cupy_ops, "_launch", lambda *args, **kwargs: launches.append((args, kwargs)))
    monkeypatch.setattr(cupy_ops, "_check_cuda", lambda *tensors: None)
    monkeypatch.setattr(cupy_ops, "gemv_supported", lambda qw: True)
    qw = quantize(torch.randn(40, 256), QuantScheme(4, 64))
    x = torch.randn(rows, 1, 256).to(torch.float16)  # [rows, T, I]
    y = cupy_ops.quant_linear(x, qw, torch.randn(40), config=cupy_ops.GemvConfig(2, 1, 8))
    assert y.shape == (rows, 1, 40) and y.dtype == torch.float16
    (args, kwargs), = launches
    _, source, kernel, grid, block, kernel_args = args
    assert (source, kernel, grid, block) == ("gemv.cu", "quant_gemv_int4_f16_u2m1", (3, math.ceil(rows / 8)), 256)
    assert kwargs == {"shared_mem": 8 * 128 * 4}
    params = _kernel_params("gemv.cu")
    assert len(params) == 11
    _check_argument_types(params, kernel_args)
    assert [int(a) for a in kernel_args[6:]] == [40, 256, 64, rows, 1]  # O, I, gs, batch, cpg_shift


@pytest.mark.parametrize("rows", [1, 8, 9, 16, 17, 32])
def test_quant_linear_takes_two_batch_tiles_per_block_beyond_8_rows(rows, monkeypatch):
    """The default launch: DEFAULT_GEMV (one 8-row tile per block) up to 8 rows; beyond, DEFAULT_GEMV_WIDE's two
    tiles per block (an n2 kernel), so that the grid has ceil(rows / 16) batch chunks, each reading the weight once,
    and shared memory for both tiles' partial sums."""
    launches = []
    monkeypatch.setattr(cupy_ops, "_launch", lambda *args, **kwargs: launches.append((args, kwargs)))
    monkeypatch.setattr(cupy_ops, "_check_cuda", lambda *tensors: None)
    monkeypatch.setattr(cupy_ops, "gemv_supported", lambda qw: True)
    qw = quantize(torch.randn(40, 256), QuantScheme(4, 64))
    cupy_ops.quant_linear(torch.randn(rows, 256).to(torch.bfloat16), qw)
    (args, kwargs), = launches
    _, _, kernel, grid, block, _ = args
    config = cupy_ops.DEFAULT_GEMV if rows <= 8 else cupy_ops.DEFAULT_GEMV_WIDE
    tiles = 1 if rows <= 8 else 2
    rows_per_block = 16 * config.m_tiles
    assert kernel == f"quant_gemv_int4_bf16_u{config.unroll}m{config.m_tiles}" + ("n2" if tiles == 2 else "")
    assert grid == (math.ceil(40 / rows_per_block), math.ceil(rows / (8 * tiles))) and block == 32 * config.warps
    assert kwargs == {"shared_mem": config.warps * config.m_tiles * tiles * 128 * 4}


@pytest.mark.parametrize(("rows", "picks", "x_div"), [(1, 6, 2), (5, 8, 8), (13, 8, 1)])
def test_routed_gemv_launches_once_over_picks_and_matrices_with_the_kernels_argument_types(rows, picks, x_div,
                                                                                         monkeypatch):
    """routed_quant_linear's launch, recorded: grid (row blocks, picks x chunks of each pick's rows, matrices),
    default_gemv(rows)'s kernel under its routed name (two batch tiles beyond 8 rows), pointers as 8-byte ints and
    `int` as np.int32, the table's expert count among them. (1, 6, 2): a token's picks; (5, 8, 8), (13, 8, 1): every
    expert over all rows, gate and up (x shared) and down (x per expert)."""
    launches = []
    monkeypatch.setattr(cupy_ops, "_launch", lambda *args, **kwargs: launches.append((args, kwargs)))
    monkeypatch.setattr(cupy_ops, "_check_cuda", lambda *tensors: None)
    table = cupy_ops.ExpertTable(torch.ones(2, 3, 8, dtype=torch.int64), (40, 256), 4, 64)
    x = torch.randn(picks // x_div * rows, 256).half()
    y = cupy_ops.routed_quant_linear(x, table, torch.arange(picks) % 8, x_div, rows)
    assert y.shape == (2, picks * rows, 40) and y.dtype == torch.float16
    (args, kwargs), = launches
    _, source, kernel, grid, block, kernel_args = args
    config = cupy_ops.default_gemv(rows)
    tiles = cupy_ops.batch_tiles(rows, config)
    suffix = "n2" if tiles == 2 else ""
    assert (source, kernel) == ("routed_gemv.cu", f"routed_gemv_int4_f16_u{config.unroll}m{config.m_tiles}{suffix}")
    chunks = math.ceil(rows / (8 * tiles))
    assert grid == (math.ceil(40 / (16 * config.m_tiles)), picks * chunks, 2) and block == 32 * config.warps
    assert kwargs == {"shared_mem": config.warps * config.m_tiles * tiles * 128 * 4}
    params = _kernel_params("routed_gemv.cu")
    assert len(params) == 12
    _check_argument_types(params, kernel_args)
    assert int(kernel_args[2]) == 8  # num_experts
    assert [int(a) for a in kernel_args[5:11]] == [40, 256, 64, picks, x_div, rows]  # O, I, gs, picks, x_div, rows


@pytest.mark.parametrize(("rows", "experts", "words"), [
    (2, torch.tensor([0, 1, 2, 3, 4, 0]), "x must be fp16/bf16 \\[3 \\* 1, 256\\] for 6 picks of 1 rows, 2 per"),
    (3, torch.tensor([0, 1, 2, 3, 4, 0], dtype=torch.int32), "experts must be int64"),
])
def test_routed_gemv_refuses_x_or_picks_that_do_not_fit(rows, experts, words, monkeypatch):
    monkeypatch.setattr(cupy_ops, "_launch", lambda *args, **kwargs: pytest.fail("launched"))
    table = cupy_ops.ExpertTable(torch.ones(1, 3, 5, dtype=torch.int64), (40, 256), 4, 64)
    with pytest.raises(TiermemError, match=words):
        cupy_ops.routed_quant_linear(torch.randn(rows, 256).half(), table, experts, 2)


def test_the_routed_reference_runs_each_pick_over_its_block_of_rows():
    """reference.routed_linear, the CPU path and the GPU kernels' specification: pick p takes rows
    (p // x_div) * rows .. + rows - 1 of x through its expert's matrix m, into rows p * rows .. of y[m]."""
    gen = torch.Generator().manual_seed(7)
    matrices = [[torch.randn(6, 16, generator=gen) for _ in range(4)] for _ in range(2)]
    x = torch.randn(2 * 3, 16, generator=gen)  # 2 blocks of 3 rows
    experts = torch.tensor([3, 0, 1, 1])  # x_div 2: picks 0, 1 read block 0, picks 2, 3 block 1
    y = reference.routed_linear(x, matrices, experts, 2, rows=3)
    assert y.shape == (2, 4 * 3, 6)
    for m, row in enumerate(matrices):
        for p, e in enumerate(experts.tolist()):
            block = x[(p // 2) * 3:(p // 2) * 3 + 3]
            torch.testing.assert_close(y[m, p * 3:p * 3 + 3], block @ row[e].T)


def test_expert_tables_are_made_once_and_go_with_their_weights(monkeypatch):
    """The table holds the codes', scales' and zeros' addresses of matrices[m][e]; the same weight objects find it
    again, other ones make another, and the entry goes when the weights do."""
    import gc

    monkeypatch.setattr(cupy_ops, "routed_supported", lambda matrices, device: True)  # CPU tensors stand in
    matrices = [[quantize(torch.randn(16, 64), QuantScheme(4, 32)) for _ in range(3)] for _ in range(2)]
    before = len(cupy_ops._expert_tables)
    table = cupy_ops.expert_table(matrices, torch.device("cpu"))
    assert table.shape == (16, 64) and (table.bits, table.group_size) == (4, 32)
    assert table.pointers.tolist() == [[[w.qdata.data_ptr() for w in row], [w.scale.data_ptr() for w in row],
                                        [w.zero.data_ptr() for w in row]] for row in matrices]
    assert cupy_ops.expert_table(matrices, torch.device("cpu")) is table
    swapped = [matrices[0], [matrices[1][0], matrices[1][2], matrices[1][1]]]
    assert cupy_ops.expert_table(swapped, torch.device("cpu")) is not table
    assert cupy_ops.expert_table([[w.to("cpu") for w in row] for row in matrices], torch.device("cpu"),
                                 build=False) is None
    del matrices, swapped
    gc.collect()
    assert len(cupy_ops._expert_tables) == before


def test_gemv_config_takes_one_or_two_batch_tiles():
    assert cupy_ops.GemvConfig(batch_tiles=2).batch_tiles == 2
    with pytest.raises(TiermemError, match="batch_tiles must be 1 or 2"):
        cupy_ops.GemvConfig(batch_tiles=4)


def _ptxas_report(log: str) -> dict[str, tuple[int, int, int]]:
    """kernel -> (registers, stack bytes, spill store bytes) from `nvcc -Xptxas -v` output."""
    report, name, frame = {}, None, (0, 0)
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line):
            frame = (int(m.group(1)), int(m.group(2)))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            report[name] = (int(m.group(1)), *frame)
            name = None
    return report


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_sources_compile_without_spills(tmp_path):
    sources = sorted(cupy_ops.CUDA_DIR.glob("*.cu"))
    assert {s.name for s in sources} >= {"gemv.cu", "dequant.cu", "elementwise.cu", "kv_attention.cu"}
    jobs = []
    for src in sources:
        cmd = ["nvcc", "-arch=sm_90", "-std=c++17", "-c", "-Xptxas", "-v", str(src), "-o",
               str(tmp_path / f"{src.stem}.o")]
        jobs.append((src, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for src, job in jobs:
        log, _ = job.communicate(timeout=600)
        assert job.returncode == 0, f"{src.name} failed to compile:\n{log}"
        assert "warning" not in log.lower(), log
        report = _ptxas_report(log)
        assert report, f"no kernels reported for {src.name}"
        for kernel, (_, stack, spill) in report.items():
            assert stack == 0 and spill == 0, f"{kernel} uses {stack} B of stack, spills {spill} B"


@pytest.mark.parametrize("case", [
    # batch, heads, kv heads, head dim, slots filled, max slots, bits, group, window, slots per split
    (2, 4, 2, 32, 9, 12, 8, 32, None, None),
    (2, 4, 1, 32, 11, 11, 4, 8, None, 4),
    (2, 4, 1, 32, 11, 11, 4, 8, None, 2),  # row 0's first split is all padding
    (1, 6, 3, 16, 13, 20, 4, 16, 5, 5),
])
def test_kv_attention_kernel_model_matches_dequantize_then_sdpa(case):
    """The CPU model of kv_attention.cu (its indexing, replayed) against the path it replaces, with left
    padding and a key mask that is a row slice of a longer one (as the engine passes it), the sequence in one
    split or several."""
    import torch.nn.functional as F
    from kv_attention_simulation import simulate_kv_attention

    from tiermem.engine.attention import causal_mask
    from tiermem.kernels.kv_quant import dequantize_kv, quantize_kv

    b, heads, kv_heads, dh, length, s_max, bits, group, window, chunk = case
    gen = torch.Generator().manual_seed(sum(case[:6]))
    scheme = QuantScheme(bits, group)
    k = quantize_kv(torch.randn(b, kv_heads, s_max, dh, generator=gen), scheme)
    v = quantize_kv(torch.randn(b, kv_heads, s_max, dh, generator=gen), scheme)
    q = torch.randn(b, heads, dh, generator=gen)
    full_mask = torch.ones(b + 1, s_max + 7, dtype=torch.bool)
    full_mask[1, :3] = False  # row 0 of the slice below is left-padded
    key_mask = full_mask[1:, :length]
    out = simulate_kv_attention(q, k, v, bits, group, key_mask, length, window, dh**-0.5, chunk=chunk)
    kd = dequantize_kv(*(t[:, :, :length] for t in k), scheme, torch.float32)
    vd = dequantize_kv(*(t[:, :, :length] for t in v), scheme, torch.float32)
    ref = F.scaled_dot_product_attention(q[:, :, None], kd, vd, attn_mask=causal_mask(key_mask, length - 1, window),
                                         scale=dh**-0.5, enable_gqa=heads != kv_heads)[:, :, 0]
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), float((out - ref).abs().max())


def test_kv_attention_kernel_limits_and_splits():
    """Which shapes the fused KV attention takes (the rest fall back to dequantize + SDPA), and how it splits the
    sequence: enough blocks for the GPU, every split non-empty, a split's scores within shared memory."""
    from tiermem.kernels.cupy_ops import KV_ATTENTION_SHARED_FLOATS, kv_attention_splits, kv_attention_supported

    assert kv_attention_supported(96, 8, 128, 4, 128) and kv_attention_supported(32, 32, 64, 8, 8)
    assert not kv_attention_supported(64, 2, 128, 4, 128)  # 32 query heads per kv head
    assert not kv_attention_supported(32, 8, 128, 4, 4)  # groups narrower than a word of 8 dims
    assert not kv_attention_supported(32, 8, 100, 8, 100)  # head_dim not a multiple of 8
    assert not kv_attention_supported(32, 8, 128, 2, 128)
    for b, heads, kv_heads, dh, length in [(64, 96, 8, 128, 518), (1, 32, 8, 128, 4096), (1, 16, 1, 256, 12000),
                                           (8, 64, 8, 128, 1), (2, 8, 8, 64, 65)]:
        splits, chunk = kv_attention_splits(b, heads, kv_heads, dh, length, 132)
        assert (splits - 1) * chunk < length <= splits * chunk
        assert heads // kv_heads * (dh + chunk) <= KV_ATTENTION_SHARED_FLOATS
    assert kv_attention_splits(1, 32, 8, 128, 4096, 132)[0] > 16  # one row still fills the GPU
    assert kv_attention_splits(16, 32, 8, 128, 2304, 132)[0] == 5  # 640 blocks: about 4 per SM
    assert kv_attention_splits(64, 96, 8, 128, 518, 132)[0] == 2  # 512 blocks, split once for 4 per SM


def _simulate_kv_quantize(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                          group: int, row0: int, start: int) -> None:
    """kv_quant.cu replayed thread by thread: index -> (row, kv head, token, group), strided reads of x, the flat
    slot offset, fp16 rounding of scale and zero, half-to-even rounding, int4 packing."""
    rows, kv_heads, tokens, head_dim = x.shape
    s_max = codes.shape[2]
    groups = head_dim // group
    sr, sh, st, sd = x.stride()
    flat_x = x.as_strided((x.untyped_storage().nbytes() // x.element_size(),), (1,), 0).float()
    base = x.storage_offset()
    flat_codes, flat_scale, flat_zero = codes.view(-1), scale.view(-1), zero.view(-1)
    levels = float(2**bits - 1)
    for idx in range(rows * kv_heads * tokens * groups):
        g, v = idx % groups, idx // groups
        t, v = v % tokens, v // tokens
        h, r = v % kv_heads, v // kv_heads
        first = base + r * sr + h * sh + t * st + g * group * sd
        vals = [float(flat_x[first + i * sd]) for i in range(group)]
        s16 = torch.tensor((max(vals) - min(vals)) / levels, dtype=torch.float32).to(torch.float16)
        z16 = torch.tensor(min(vals), dtype=torch.float32).to(torch.float16)
        s32, z32 = float(s16), float(z16)
        safe = s32 if s32 > 0 else 1.0
        slot = ((row0 + r) * kv_heads + h) * s_max + start + t
        flat_scale[slot * groups + g], flat_zero[slot * groups + g] = s16, z16
        out = slot * (head_dim * bits // 8) + g * group * bits // 8

        def code(value: float, z32: float = z32, safe: float = safe) -> int:
            q = torch.tensor(value, dtype=torch.float32) - torch.tensor(z32, dtype=torch.float32)
            return int(torch.round(q / torch.tensor(safe, dtype=torch.float32)).clamp(0, levels))

        for i in range(0, group, 8 // bits):
            if bits == 8:
                flat_codes[out + i] = code(vals[i])
            else:
                flat_codes[out + (i >> 1)] = code(vals[i]) | (code(vals[i + 1]) << 4)


@pytest.mark.parametrize("bits,group", [(8, 16), (4, 8), (4, 32)])
def test_kv_quantize_kernel_model_writes_what_the_reference_writes(bits, group):
    """The CPU model of kv_quant.cu against quantize_kv + slice copies, bit for bit: a non-contiguous x (as k after
    a transpose), written at batch rows 1..2 and slots 3..5 of a larger cache."""
    from tiermem.engine.kv_cache import QuantizedKV

    scheme = QuantScheme(bits, group)
    gen = torch.Generator().manual_seed(bits + group)
    x = torch.randn(2, 3, 3, 32, generator=gen).transpose(1, 2).contiguous().transpose(1, 2)  # [2, 3 kv, 3 tok, 32]
    x[0, 1, 2] = 0.5  # a constant vector: scale 0
    ref = QuantizedKV.zeros(4, 3, 8, 32, scheme, torch.float32, "cpu")
    mine = QuantizedKV.zeros(4, 3, 8, 32, scheme, torch.float32, "cpu")
    ref.write(slice(1, 3), 3, x)
    _simulate_kv_quantize(x, mine.codes, mine.scale, mine.zero, bits, group, 1, 3)
    for a, b in zip(ref.tensors, mine.tensors, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits,group", [(8, 16), (4, 8), (4, 32)])
def test_quantized_write_at_a_slot_in_a_tensor_writes_what_the_write_at_that_slot_does(bits, group):
    """ops.write_quantized_kv with its slot in a tensor, off the kernel's path (the CPU), against
    write_quantized_kv at the same slot as an int: every row, bit for bit."""
    from tiermem.engine.kv_cache import QuantizedKV

    scheme = QuantScheme(bits, group)
    x = torch.randn(2, 3, 1, 64, generator=torch.Generator().manual_seed(bits * group))  # [B, Hkv, 1, Dh]
    ref = QuantizedKV.zeros(2, 3, 9, 64, scheme, torch.float32, "cpu")
    mine = QuantizedKV.zeros(2, 3, 9, 64, scheme, torch.float32, "cpu")
    ref.write(slice(None), 5, x)
    mine.write(slice(None), torch.tensor([5]), x)
    for a, b in zip(ref.tensors, mine.tensors, strict=True):
        assert torch.equal(a, b)
    assert mine.codes[:, :, 5].any() and not mine.codes[:, :, :5].any() and not mine.codes[:, :, 6:].any()


@pytest.mark.parametrize("slot", [torch.zeros(1, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)])
def test_kernels_take_a_slot_in_device_memory_only_as_int64_1(slot):
    """kv_attention_cuda's query_slot and kv_quantize_cuda's start_slot, checked before any launch."""
    q = torch.zeros(2, 8, 64, dtype=torch.float16)  # [b, H, Dh]
    codes = torch.zeros(2, 2, 16, 32, dtype=torch.uint8)  # int4: [b, Hkv, S_max, Dh / 2]
    scale = torch.zeros(2, 2, 16, 2, dtype=torch.float16)  # group 32
    kv = (codes, scale, scale)
    with pytest.raises(TiermemError, match="kv_attention_cuda: query_slot must be int64 \\[1\\]"):
        cupy_ops.kv_attention_cuda(q, kv, kv, 4, 32, torch.ones(2, 16, dtype=torch.bool), 4, None, 0.125,
                                   query_slot=slot)
    with pytest.raises(TiermemError, match="kv_quantize_cuda: start_slot must be int64 \\[1\\]"):
        cupy_ops.kv_quantize_cuda(q[:, :2, None], codes, scale, scale, 4, 32, 0, 0, start_slot=slot)

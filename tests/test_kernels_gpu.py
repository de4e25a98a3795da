"""GPU checks of the CuPy kernels against the torch reference (kernels/reference.py) on the same device.

Every test draws fresh seeded random inputs (never zeros), poisons the output buffer with NaN before
the launch so that an unwritten element fails, synchronizes after each launch so that asynchronous
errors surface, and compares with the reference computed in fp32 (or float64) by
||out - ref|| / ||ref||. fp16 results must land within 2e-3; bf16 within 6e-3 (bf16 rounding of the
output alone costs ~1.5e-3 and the dequantized weight adds about as much).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import replace

import pytest
import torch

from tiermem.kernels import cupy_ops, ops, reference
from tiermem.kernels.cupy_ops import cuda_kernels_available
from tiermem.kernels.quant import QuantizedWeight, QuantScheme, quantize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_kernels_available(), reason="needs a CUDA GPU (sm_80+) and CuPy"),
]

TOL = {torch.float16: 2e-3, torch.bfloat16: 6e-3}
HALF = [torch.float16, torch.bfloat16]


def _gen(*key: object) -> torch.Generator:
    """A generator seeded from the test's parameters (stable across runs, unlike hash())."""
    return torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(key).encode()))


def _randn(shape, gen, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, device="cuda") * scale).to(dtype)


def _poison(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    torch.cuda.synchronize()
    out, ref = out.double(), ref.double()
    bad = (~torch.isfinite(out)).sum().item()
    assert bad == 0, f"{bad} elements not written or not finite"
    return ((out - ref).norm() / ref.norm()).item()


def _quantized(out_features, in_features, bits, group, gen) -> QuantizedWeight:
    w = _randn((out_features, in_features), gen, scale=0.05)
    qw = quantize(w, QuantScheme(bits, group))
    assert qw.qdata.is_cuda
    return qw


def _linear_ref(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    ref = x.float() @ reference.dequantize(qw, torch.float32).T
    return ref if bias is None else ref + bias.float()


# ------------------------------------------------------------------------------------------ GEMV

GEMV_SHAPES = [
    # out, in, bits, group
    (100, 64 * 7, 4, 64),
    (100, 128 * 5, 4, 128),
    (37, 64 * 9, 8, 64),
    (300, 128 * 3, 8, 128),
    (45, 32 * 5, 4, 32),
    (1000, 4096, 4, 64),
    (3000, 11008, 4, 128),
    (4096, 1024, 8, 64),
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("batch", [1, 3, 8, 9, 13, 16, 33])  # 8-row chunks of the batch: 1, 2 or 5 in one launch
@pytest.mark.parametrize(("out_features", "in_features", "bits", "group"), GEMV_SHAPES)
def test_quant_gemv(out_features, in_features, bits, group, batch, dtype):
    gen = _gen("gemv", out_features, in_features, bits, group, batch, dtype)
    qw = _quantized(out_features, in_features, bits, group, gen)
    x = _randn((batch, in_features), gen, dtype)
    bias = _randn((out_features,), gen, dtype) if batch != 3 else None
    out = _poison((batch, out_features), dtype)
    y = cupy_ops.quant_linear(x, qw, bias, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert _rel_err(y, _linear_ref(x, qw, bias)) < TOL[dtype]


GEMV_TEST_CONFIGS = (*cupy_ops.GEMV_VARIANTS, *(replace(v, batch_tiles=2) for v in cupy_ops.GEMV_VARIANTS),
                     cupy_ops.GemvConfig(2, 1, 4), cupy_ops.GemvConfig(2, 1, 4, batch_tiles=2))


@pytest.mark.parametrize("config", GEMV_TEST_CONFIGS, ids=str)
@pytest.mark.parametrize(("bits", "dtype"), [(4, torch.float16), (4, torch.bfloat16), (8, torch.float16),
                                             (8, torch.bfloat16)])
def test_quant_gemv_variants(bits, dtype, config):
    gen = _gen("variant", bits, dtype, config)
    qw = _quantized(77, 128 * 9, bits, 128, gen)
    for batch in (1, 5, 8, 9, 16, 21):
        x = _randn((batch, 128 * 9), gen, dtype)
        bias = _randn((77,), gen, dtype)
        y = cupy_ops.quant_linear(x, qw, bias, config=config, out=_poison((batch, 77), dtype))
        assert _rel_err(y, _linear_ref(x, qw, bias)) < TOL[dtype]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("bits", "group", "in_features"), [(4, 6, 96 * 3), (4, 48, 96 * 3), (8, 10, 80 * 3),
                                                            (4, 16, 32 * 5)])
def test_quant_gemv_general_groups(bits, group, in_features, dtype):
    gen = _gen("general", bits, group, dtype)
    qw = _quantized(50, in_features, bits, group, gen)
    assert cupy_ops.gemv_launch_plan(qw, dtype, cupy_ops.DEFAULT_GEMV)[0].endswith("_general")
    assert cupy_ops.gemv_launch_plan(qw, dtype, cupy_ops.DEFAULT_GEMV_WIDE, 13)[0].endswith("_generaln2")
    for batch in (1, 4, 13, 21):
        x = _randn((batch, in_features), gen, dtype)
        bias = _randn((50,), gen, dtype)
        y = cupy_ops.quant_linear(x, qw, bias, out=_poison((batch, 50), dtype))
        assert _rel_err(y, _linear_ref(x, qw, bias)) < TOL[dtype]


# (out, in, bits, group): the fast kernels' shapes, one general-group case
ROUTED_SHAPES = [(100, 128 * 5, 4, 128), (37, 64 * 9, 8, 64), (45, 32 * 5, 4, 32), (50, 96 * 3, 4, 48)]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("out_features", "in_features", "bits", "group"), ROUTED_SHAPES)
def test_routed_gemv_runs_each_pick_through_its_expert_as_the_fused_gemv_does(out_features, in_features, bits,
                                                                             group, dtype):
    """Two matrices of 5 experts, 3 rows x 2 picks (one expert picked twice): each pick's output is bit for bit the
    fused GEMV's for its row and expert (the same kernel at one row), and within tolerance of the reference."""
    gen = _gen("routed", out_features, in_features, bits, group, dtype)
    matrices = [[_quantized(out_features, in_features, bits, group, gen) for _ in range(5)] for _ in range(2)]
    x = _randn((3, in_features), gen, dtype)
    experts = torch.tensor([4, 0, 2, 4, 1, 3], device="cuda")  # [P = 6], x_div 2
    table = cupy_ops.expert_table(matrices, x.device)
    assert table is not None and table.pointers.shape == (2, 3, 5)
    y = cupy_ops.routed_quant_linear(x, table, experts, 2)
    assert y.shape == (2, 6, out_features)
    for m, row in enumerate(matrices):
        for p, e in enumerate(experts.tolist()):
            assert torch.equal(y[m, p], cupy_ops.quant_linear(x[p // 2:p // 2 + 1], row[e])[0]), (m, p)
    ref = reference.routed_linear(x.float(), matrices, experts, 2)
    assert _rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rows", [4, 8, 13, 32])
def test_routed_gemv_over_every_expert_and_all_rows_is_the_fused_gemv_of_each(rows, dtype):
    """engine.moe.all_experts' launches: every expert of 6 a pick of all `rows` rows, gate and up sharing x (x_div 6),
    then down with each expert's own rows (x_div 1): bit for bit the fused GEMV of those rows through each expert
    (the same kernel and batch tiles)."""
    gen = _gen("routed-rows", rows, dtype)
    matrices = [[_quantized(96, 256, 4, 64, gen) for _ in range(6)] for _ in range(2)]
    every = torch.arange(6, device="cuda")
    x = _randn((rows, 256), gen, dtype)
    y = ops.routed_linear(x, matrices, every, 6, rows=rows)
    assert y.shape == (2, 6 * rows, 96)
    h = _randn((6 * rows, 256), gen, dtype)
    down = ops.routed_linear(h, matrices[:1], every, 1, rows=rows)
    for m, row in enumerate(matrices):
        for e, w in enumerate(row):
            assert torch.equal(y[m, e * rows:(e + 1) * rows], cupy_ops.quant_linear(x, w)), (m, e)
    for e, w in enumerate(matrices[0]):
        assert torch.equal(down[0, e * rows:(e + 1) * rows], cupy_ops.quant_linear(h[e * rows:(e + 1) * rows], w))


def test_routed_gemv_tables_are_found_again_and_capturable():
    """ops.routed_linear: the table made once for the same weights, none made during a capture (the step before it
    made it), and a captured launch reads each replay's routing."""
    gen = _gen("routed-graph")
    matrices = [[_quantized(64, 256, 4, 64, gen) for _ in range(4)]]
    x = _randn((2, 256), gen, torch.bfloat16)
    experts = torch.tensor([1, 3], device="cuda")
    first = ops.routed_table(x, matrices)
    assert first is not None and ops.routed_table(x, matrices) is first
    other = [[_quantized(64, 256, 4, 64, gen) for _ in range(4)]]
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    ops.routed_linear(x, matrices, experts, 1)  # warm-up (the kernel compiled and loaded)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        assert ops.routed_table(x, other) is None
        y = ops.routed_linear(x, matrices, experts, 1)
    for picks in ([0, 2], [3, 3]):
        experts.copy_(torch.tensor(picks))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, ops.routed_linear(x, matrices, experts.clone(), 1))


@pytest.mark.parametrize("lead", [(2, 3), (3, 5)])  # 6 rows, 15 rows (two chunks)
def test_quant_gemv_leading_dims_and_views(lead):
    gen = _gen("views", lead)
    qw = _quantized(200, 512, 4, 64, gen)
    big = _randn((*lead, 513), gen, torch.float16)
    x = big[..., 1:]  # non-contiguous, misaligned
    y = cupy_ops.quant_linear(x, qw)
    assert y.shape == (*lead, 200)
    assert _rel_err(y, _linear_ref(x, qw, None)) < TOL[torch.float16]


def test_launches_follow_torchs_current_stream():
    """A kernel goes on torch's current stream: on a side stream it reads x only after the copy queued before it
    behind a sleep (on another stream it would read the NaN x)."""
    gen = _gen("stream")
    qw = _quantized(300, 1024, 4, 64, gen)
    src = _randn((13, 1024), gen, torch.float16)
    x, out = _poison((13, 1024), torch.float16), _poison((13, 300), torch.float16)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~0.05 s of GPU clock cycles
        x.copy_(src)
        y = cupy_ops.quant_linear(x, qw, out=out)
        normed = cupy_ops.rms_norm_cuda(x, torch.ones(1024, dtype=torch.float16, device="cuda"), 1e-6)
    side.synchronize()
    assert _rel_err(y, _linear_ref(src, qw, None)) < TOL[torch.float16]
    assert _rel_err(normed, reference.rms_norm(src.float(), torch.ones(1024, device="cuda"), 1e-6)) < TOL[torch.float16]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_a_device_other_than_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current, and the reverse: each device's own module and stream, and the
    current device (torch's and CuPy's) left as it was."""
    import cupy

    for device, current in (("cuda:1", 0), ("cuda:0", 1)):
        gen = _gen("device", device)
        qw = _quantized(100, 512, 8, 64, gen).to(device)
        x = _randn((11, 512), gen, torch.bfloat16).to(device)
        out = torch.full((11, 100), float("nan"), dtype=torch.bfloat16, device=device)
        with torch.cuda.device(current):
            y = cupy_ops.quant_linear(x, qw, out=out)
            assert torch.cuda.current_device() == current and cupy.cuda.runtime.getDevice() == current
        torch.cuda.synchronize(device)
        assert y.device == torch.device(device)
        assert _rel_err(y, _linear_ref(x, qw, None)) < TOL[torch.bfloat16]


# ------------------------------------------------------------------------------- dequantization

DEQUANT_SHAPES = [
    # out, in, bits, group: vector path when the row is a multiple of 8 bytes, else scalar
    (64, 64 * 5, 4, 64),
    (33, 128 * 3, 8, 128),
    (17, 6 * 3, 4, 6),     # 9-byte rows: scalar
    (19, 10 * 3, 8, 10),   # 30-byte rows: scalar
    (21, 48 * 3, 4, 48),   # vector, 16-column units inside one group
    (23, 48, 4, 6),        # vector, a unit spans several groups
    (9, 80, 8, 10),        # vector, a unit spans several groups
    (513, 4096, 4, 128),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("out_features", "in_features", "bits", "group"), DEQUANT_SHAPES)
def test_dequantize_is_bit_exact(out_features, in_features, bits, group, dtype):
    gen = _gen("dequant", out_features, in_features, bits, group, dtype)
    qw = _quantized(out_features, in_features, bits, group, gen)
    out = cupy_ops.dequantize_cuda(qw, dtype, out=_poison((out_features, in_features), dtype))
    torch.cuda.synchronize()
    assert torch.equal(out, reference.dequantize(qw, dtype))


# ------------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rows", [1, 8, 9, 13, 16, 17, 32, 33, 40])
def test_ops_linear_dispatch(rows, dtype, monkeypatch):
    """One launch either way: the fused GEMV up to GEMV_SPLIT_ROWS rows, dequantization (then matmul) above."""
    gen = _gen("ops", rows, dtype)
    qw = _quantized(96, 256, 4, 64, gen)
    x = _randn((rows, 256), gen, dtype)
    bias = _randn((96,), gen, torch.float32)  # cast to x's dtype, as the reference does
    launch, kernels = cupy_ops._launch, []
    monkeypatch.setattr(cupy_ops, "_launch", lambda *args, **kwargs: (kernels.append(args[2]), launch(*args, **kwargs)))
    y = ops.linear(x, qw, bias)
    assert len(kernels) == 1 and kernels[0].startswith("quant_gemv" if rows <= ops.GEMV_SPLIT_ROWS else "dequant")
    assert y.dtype == dtype and y.shape == (rows, 96)
    assert _rel_err(y, _linear_ref(x, qw, bias.to(dtype))) < TOL[dtype]
    dense = reference.dequantize(qw, dtype)
    assert _rel_err(ops.linear(x, dense, bias), _linear_ref(x, qw, bias.to(dtype))) < TOL[dtype]


def test_ops_linear_fp32_and_odd_layouts():
    gen = _gen("ops-odd")
    qw = _quantized(30, 18, 4, 6, gen)  # 9-byte rows: no fused GEMV, dequantize + matmul
    x = _randn((2, 18), gen, torch.float16)
    assert _rel_err(ops.linear(x, qw), _linear_ref(x, qw, None)) < TOL[torch.float16]
    x32 = _randn((3, 18), gen)
    assert _rel_err(ops.linear(x32, qw), _linear_ref(x32, qw, None)) < 1e-5
    assert torch.equal(ops.dequantize(qw, torch.float16), reference.dequantize(qw, torch.float16))


# ------------------------------------------------------------------------------------ elementwise


def _close_to_torch(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Within one unit of the last place of the reference run by torch on the same device."""
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    eps = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out, ref, rtol=eps, atol=eps * ref.abs().max().item() * 1e-3)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 4096), (3, 5, 1000), (7, 100), (2, 8), (4, 5000)])
def test_rms_norm(shape, weight_dtype, dtype):
    gen = _gen("rms", shape, weight_dtype, dtype)
    x = _randn(shape, gen, dtype, scale=3.0)
    w = (1.0 + _randn(shape[-1:], gen, scale=0.1)).to(weight_dtype)
    out = cupy_ops.rms_norm_cuda(x, w, 1e-6, out=_poison(shape, dtype))
    ref32 = reference.rms_norm(x.float(), w.float(), 1e-6)
    assert _rel_err(out, ref32) < TOL[dtype]
    _close_to_torch(out, reference.rms_norm(x, w, 1e-6))
    _close_to_torch(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cos_dtype", ["same", torch.float32])
@pytest.mark.parametrize(("batch", "heads", "seq", "head_dim", "cos_batch"),
                         [(1, 32, 1, 128, 1), (2, 4, 7, 64, 2), (3, 2, 5, 96, 1), (2, 3, 4, 16, 2)])
def test_rope(batch, heads, seq, head_dim, cos_batch, cos_dtype, dtype):
    gen = _gen("rope", batch, heads, seq, head_dim, cos_dtype, dtype)
    cdtype = dtype if cos_dtype == "same" else cos_dtype
    # x as the engine makes it: [B, T, H, Dh] transposed to [B, H, T, Dh] (non-contiguous).
    x = _randn((batch, seq, heads, head_dim), gen, dtype).transpose(1, 2)
    angles = torch.rand((cos_batch, seq, head_dim // 2), generator=gen, device="cuda") * 6.3
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(cdtype), angles.sin().to(cdtype)
    out = cupy_ops.apply_rope_cuda(x, cos, sin, out=_poison((batch, heads, seq, head_dim), dtype))
    ref32 = reference.apply_rope(x.float(), cos.float(), sin.float())
    assert _rel_err(out, ref32) < TOL[dtype]
    _close_to_torch(out, reference.apply_rope(x, cos, sin))
    _close_to_torch(ops.apply_rope(x, cos, sin), reference.apply_rope(x, cos, sin))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(1, 11008), (3, 7, 100), (5, 13), (2, 1, 14336)])
def test_silu_mul(shape, dtype):
    gen = _gen("silu", shape, dtype)
    gate, up = _randn(shape, gen, dtype, scale=3.0), _randn(shape, gen, dtype)
    out = cupy_ops.silu_mul_cuda(gate, up, out=_poison(shape, dtype))
    assert _rel_err(out, reference.silu_mul(gate.float(), up.float())) < TOL[dtype]
    _close_to_torch(out, reference.silu_mul(gate, up))
    n = math.prod(shape)
    flat = _randn((2, n + 1), gen, dtype)
    g2, u2 = flat[0, 1:].view(shape), flat[1, 1:].view(shape)  # 2-byte offsets: the scalar path
    _close_to_torch(ops.silu_mul(g2, u2), reference.silu_mul(g2, u2))


# ------------------------------------------------------------------------------- quantized KV attention

KV_ATTENTION_CASES = [
    # batch, heads, kv heads, head dim, slots filled, max slots, bits, group, window
    (2, 8, 2, 64, 37, 48, 8, 64, None),
    (3, 4, 4, 128, 129, 130, 4, 128, None),
    (1, 12, 4, 128, 300, 512, 4, 32, None),
    (2, 8, 1, 64, 50, 64, 8, 16, 16),  # sliding window
    (4, 96 // 8, 1, 128, 518, 520, 4, 128, None),  # 111B-like GQA ratio
    (1, 32, 8, 128, 4096, 4100, 4, 128, None),  # one row: the sequence in many splits
    (1, 16, 1, 64, 1000, 1024, 8, 64, 100),  # 16 query heads per kv head, a window over several splits
    (2, 4, 4, 256, 333, 400, 8, 32, None),  # the largest head dim
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", KV_ATTENTION_CASES)
def test_kv_decode_attention_matches_dequantize_then_sdpa(case, dtype):
    """The fused kernel against the path it replaces: dequantize_kv + SDPA under engine.attention.causal_mask,
    with left padding in the key mask."""
    import torch.nn.functional as F

    from tiermem.engine.attention import causal_mask
    from tiermem.kernels.kv_quant import dequantize_kv, quantize_kv

    b, heads, kv_heads, dh, length, s_max, bits, group, window = case
    gen = _gen("kv-attention", case, dtype)
    scheme = QuantScheme(bits, group)
    k = quantize_kv(_randn((b, kv_heads, s_max, dh), gen), scheme)  # (codes, scale, zero) [b, Hkv, S_max, *]
    v = quantize_kv(_randn((b, kv_heads, s_max, dh), gen), scheme)
    q = _randn((b, heads, 1, dh), gen, dtype)
    key_mask = torch.ones(b, s_max, dtype=torch.bool, device="cuda")
    key_mask[0, : length // 3] = False  # row 0 left-padded
    assert ops.kv_decode_attention_supported(q, kv_heads, bits, group, length)
    out = ops.kv_decode_attention(q, k, v, bits, group, key_mask[:, :length], length, window, dh**-0.5)
    assert out.shape == q.shape and out.dtype == dtype
    kd = dequantize_kv(*(t[:, :, :length] for t in k), scheme, torch.float32)
    vd = dequantize_kv(*(t[:, :, :length] for t in v), scheme, torch.float32)
    mask = causal_mask(key_mask[:, :length], length - 1, window)
    ref = F.scaled_dot_product_attention(q.float(), kd, vd, attn_mask=mask, scale=dh**-0.5,
                                         enable_gqa=heads != kv_heads)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 6e-3}[dtype]
    err = _rel_err(out, ref)
    assert err < tol, f"rel err {err:.2e}"


@pytest.mark.parametrize("case", KV_ATTENTION_CASES)
def test_kv_decode_attention_at_a_query_slot_ignores_the_slots_after_it(case):
    """With query_slot (a CUDA graph's step: the length is the graph's span, the slot is read on the GPU), the
    kernel reads up to S_max slots but attends as a call of length slot + 1 does, though every key is marked real."""
    from tiermem.kernels.kv_quant import quantize_kv

    b, heads, kv_heads, dh, length, s_max, bits, group, window = case
    gen = _gen("kv-attention-slot", case, torch.bfloat16)
    scheme = QuantScheme(bits, group)
    k = quantize_kv(_randn((b, kv_heads, s_max, dh), gen), scheme)
    v = quantize_kv(_randn((b, kv_heads, s_max, dh), gen), scheme)
    q = _randn((b, heads, 1, dh), gen, torch.bfloat16)
    key_mask = torch.ones(b, s_max, dtype=torch.bool, device="cuda")
    key_mask[0, : length // 3] = False
    slot = torch.tensor([length - 1], device="cuda")
    at_slot = ops.kv_decode_attention(q, k, v, bits, group, key_mask, s_max, window, dh**-0.5, query_slot=slot)
    plain = ops.kv_decode_attention(q, k, v, bits, group, key_mask, length, window, dh**-0.5)
    err = _rel_err(at_slot, plain.float())
    assert err < 6e-3, f"rel err {err:.2e}"


def _teacher_forced_with_and_without(flag: str, kv_quant: str, monkeypatch, tmp_path) -> dict[bool, torch.Tensor]:
    """Teacher-forced logits [2, 20, V] of a small GQA llama (prompt 8, then 12 decode steps) over a `kv_quant`
    cache, with the kernels.ops switch `flag` off and on."""
    from hf_models import teacher_forced

    import tiermem
    from tiermem.engine.kv_cache import KVCache
    from tiermem.presets import preset
    from tiermem.synthetic import write_hf_checkpoint

    config = dict(preset("llama-1b"), hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=512, torch_dtype="float32")
    store = tiermem.pack(write_hf_checkpoint(config, tmp_path / "hf", seed=4), tmp_path / "store", progress=False)
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(ops, flag, on)
        with tiermem.load(store, device="cuda", dtype=torch.float16, max_batch_size=2, max_seq_len=64,
                          kv_quant=kv_quant, plan=None) as m:
            cache = KVCache.allocate(m.config, 2, 40, m.dtype, m.device, kv_quant=m.kv_quant)
            outs[on] = teacher_forced(m, cache, ids, torch.ones_like(ids), 8).float()
    return outs


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_generation_with_the_fused_kv_attention_follows_the_dequantize_path(kv_quant, monkeypatch, tmp_path):
    """End to end with ops.FUSED_KV_ATTENTION on and off: teacher-forced logits agree closely."""
    outs = _teacher_forced_with_and_without("FUSED_KV_ATTENTION", kv_quant, monkeypatch, tmp_path)
    err = _rel_err(outs[True], outs[False])
    assert err < 5e-3, f"fused vs dequantize path: rel err {err:.2e}"


# ----------------------------------------------------------------------- quantizing new tokens into KV

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,group,tokens", [(8, 128, 1), (4, 128, 1), (4, 32, 7), (8, 16, 300)])
def test_kv_quantize_kernel_writes_what_the_reference_writes(bits, group, tokens, dtype, monkeypatch):
    """kv_quant.cu against the reference (quantize_kv + slice copies on the CPU, IEEE fp32 as the kernel), bit for
    bit: x strided as k after a transpose, written at batch rows 1..3 and slots from 5 of a larger cache; a
    constant vector (scale 0) included."""
    from tiermem.engine.kv_cache import QuantizedKV

    monkeypatch.setattr(ops, "FUSED_KV_QUANTIZE", True)
    scheme = QuantScheme(bits, group)
    x = _randn((3, tokens, 4, 128), _gen("kv-quantize", bits, group, tokens, dtype), dtype).transpose(1, 2)
    x[0, 1, 0] = 0.25
    ref = QuantizedKV.zeros(5, 4, 320, 128, scheme, dtype, "cpu")
    ref.write(slice(1, 4), 5, x.cpu())
    kv = QuantizedKV.zeros(5, 4, 320, 128, scheme, dtype, "cuda")
    kv.write(slice(1, 4), 5, x)
    for a, b in zip(kv.tensors, ref.tensors, strict=True):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(8, 128), (4, 128), (4, 32)])
def test_kv_quantize_at_a_slot_in_device_memory_follows_each_graph_replays_slot(bits, group, dtype, monkeypatch):
    """write_quantized_kv with its slot in a device tensor, captured once in a CUDA graph, replayed with the slot
    tensor set to 7, then 300: each replay writes that slot, bit for bit as the reference at an int slot; a slot past
    S_max writes nothing."""
    from tiermem.engine.kv_cache import QuantizedKV

    monkeypatch.setattr(ops, "FUSED_KV_QUANTIZE", True)
    scheme = QuantScheme(bits, group)
    x = _randn((3, 1, 4, 128), _gen("kv-quantize-slot", bits, group, dtype), dtype).transpose(1, 2)  # [3, 4, 1, 128]
    kv = QuantizedKV.zeros(3, 4, 320, 128, scheme, dtype, "cuda")
    slot = torch.zeros(1, dtype=torch.long, device="cuda")
    kv.write(slice(None), slot, x)  # warm-up: the kernel is compiled outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kv.write(slice(None), slot, x)
    ref = QuantizedKV.zeros(3, 4, 320, 128, scheme, dtype, "cpu")
    ref.write(slice(None), 0, x.cpu())
    for at in (7, 300):
        slot.fill_(at)
        graph.replay()
        ref.write(slice(None), at, x.cpu())
    torch.cuda.synchronize()
    for a, b in zip(kv.tensors, ref.tensors, strict=True):
        assert torch.equal(a.cpu(), b)
    before = [t.clone() for t in kv.tensors]
    slot.fill_(320)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(kv.tensors, before, strict=True))


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_generation_with_the_fused_kv_quantize_follows_the_reference_path(kv_quant, monkeypatch, tmp_path):
    """End to end with ops.FUSED_KV_QUANTIZE on and off (the torch reference on the GPU): teacher-forced logits
    agree (codes may differ where the GPU reference's division rounds differently from IEEE)."""
    outs = _teacher_forced_with_and_without("FUSED_KV_QUANTIZE", kv_quant, monkeypatch, tmp_path)
    err = _rel_err(outs[True], outs[False])
    assert err < 1e-3, f"fused vs reference KV quantization: rel err {err:.2e}"

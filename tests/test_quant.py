import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem.errors import ConfigError
from tiermem.kernels.quant import QuantizedWeight, QuantScheme, error_bound, quantize, unpack_codes
from tiermem.kernels.reference import dequantize, linear


def random_weight(out_f, in_f, scale, offset, seed, constant_groups=0, group_size=2):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * scale + offset
    for k in range(constant_groups):  # whole groups holding one value (scale 0), including all-zero ones
        row, grp = k % out_f, (k * 7) % (in_f // group_size)
        w[row, grp * group_size:(grp + 1) * group_size] = 0.0 if k % 2 else offset + scale
    return w


FP16_MIN_NORMAL = 2.0**-14


def assert_within_bound(w, scheme):
    qw = quantize(w, scheme, "w")
    err = (w - dequantize(qw, torch.float32)).abs()
    bound = error_bound(w, scheme)
    worst = (err - bound).max().item()
    assert worst <= 0, f"error exceeds bound by {worst} ({scheme}, max|w|={w.abs().max().item():.3g})"
    return qw


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [2, 16, 64, 128])
@pytest.mark.parametrize(
    ("scale", "offset"), [(1.0, 0.0), (0.02, 0.0), (50.0, 0.0), (0.1, 3.0), (1e-3, -0.5)]
)
def test_error_within_bound(bits, group_size, scale, offset):
    scheme = QuantScheme(bits, group_size)
    w = random_weight(24, 256, scale, offset, seed=bits * 1000 + group_size, constant_groups=5,
                      group_size=group_size)
    qw = assert_within_bound(w, scheme)
    assert qw.qdata.dtype == torch.uint8 and qw.qdata.shape == scheme.packed_shape(24, 256)
    assert qw.scale.dtype == qw.zero.dtype == torch.float16
    assert qw.scale.shape == qw.zero.shape == (24, 256 // group_size)
    assert qw.shape == (24, 256)
    assert int(unpack_codes(qw).max()) <= 2**bits - 1


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    group_size=st.sampled_from([2, 4, 32, 64]),
    out_f=st.integers(1, 9),
    n_groups=st.integers(1, 4),
    log_scale=st.floats(-3, 3),
    offset=st.floats(-10, 10),
    seed=st.integers(0, 2**16),
)
def test_error_within_bound_random(bits, group_size, out_f, n_groups, log_scale, offset, seed):
    w = random_weight(out_f, n_groups * group_size, 10.0**log_scale, offset, seed)
    assert_within_bound(w, QuantScheme(bits, group_size))


def test_error_bound_with_subnormal_fp16_scales():
    # int8, groups of 2, std 0.02: many groups span < 255 * 2**-14, so their fp16 scale is subnormal.
    w = random_weight(24, 256, 0.02, 0.0, seed=8002)
    groups = w.reshape(24, -1, 2)
    scale = (groups.amax(-1) - groups.amin(-1)) / 255
    assert ((scale > 0) & (scale < FP16_MIN_NORMAL)).any()  # the case under test occurs
    assert_within_bound(w, QuantScheme(8, 2))


@pytest.mark.parametrize("bits", [4, 8])
def test_constant_and_zero_weights_are_exact(bits):
    scheme = QuantScheme(bits, 4)
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5], [-2.0] * 8])
    qw = quantize(w, scheme)
    assert torch.equal(dequantize(qw), w)  # values exact in fp16, scale 0
    assert torch.count_nonzero(qw.scale) == 0


def test_int4_packing_layout_low_nibble_is_even_column():
    # One group of 4 with min 0 and max 15: scale 1, zero 0, so codes equal the weights.
    w = torch.tensor([[0.0, 15.0, 3.0, 7.0], [15.0, 0.0, 9.0, 1.0]])
    qw = quantize(w, QuantScheme(4, 4))
    expected = torch.tensor([[0xF0, 0x73], [0x0F, 0x19]], dtype=torch.uint8)
    assert torch.equal(qw.qdata, expected)
    assert torch.equal(qw.scale, torch.ones(2, 1, dtype=torch.float16))
    assert torch.equal(qw.zero, torch.zeros(2, 1, dtype=torch.float16))
    assert torch.equal(unpack_codes(qw), w.to(torch.uint8))


def test_int8_layout_is_codes_row_major():
    w = torch.tensor([[0.0, 255.0, 10.0, 20.0]])
    qw = quantize(w, QuantScheme(8, 4))
    assert torch.equal(qw.qdata, torch.tensor([[0, 255, 10, 20]], dtype=torch.uint8))
    assert torch.equal(dequantize(qw), w)


def test_dequantize_by_hand():
    scheme = QuantScheme(4, 2)
    qw = QuantizedWeight(
        qdata=torch.tensor([[0x21, 0xF0]], dtype=torch.uint8),  # codes [1, 2, 0, 15]
        scale=torch.tensor([[0.5, 2.0]], dtype=torch.float16),
        zero=torch.tensor([[-1.0, 10.0]], dtype=torch.float16),
        scheme=scheme,
        shape=(1, 4),
    )
    assert torch.equal(dequantize(qw), torch.tensor([[-0.5, 0.0, 10.0, 40.0]]))
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(linear(x, qw), torch.tensor([[49.5]]))


@pytest.mark.parametrize("shape", [(64,), (2, 3, 64), (4, 96), (4, 3)])
def test_bad_shapes_raise_config_error(shape):
    with pytest.raises(ConfigError, match="group_size"):
        quantize(torch.zeros(shape), QuantScheme(4, 64), "model.layers.0.mlp.up_proj.weight")


@pytest.mark.parametrize(("bits", "group_size"), [(3, 64), (16, 64), (4, 0), (4, 1), (8, 33)])
def test_bad_schemes_raise_config_error(bits, group_size):
    with pytest.raises(ConfigError):
        QuantScheme(bits, group_size)


def test_from_name():
    assert QuantScheme.from_name(None) is None
    assert QuantScheme.from_name("int4", 32) == QuantScheme(4, 32)
    assert QuantScheme.from_name("int8").name == "int8"
    with pytest.raises(ConfigError):
        QuantScheme.from_name("int2")

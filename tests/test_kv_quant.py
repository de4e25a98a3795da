"""Quantized KV cache (int8 / int4, group-wise along head_dim): layout, error bounds, attention, end to end."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hf_models import cached_logits, left_padded_batch, packed_stores, rel_err

import tiermem
from tiermem import GenerationSession
from tiermem.engine.config import model_config_from_hf
from tiermem.engine.kv_cache import KVCache, QuantizedKV
from tiermem.errors import ConfigError
from tiermem.kernels.kv_quant import dequantize_kv, kv_scheme, quantize_kv
from tiermem.kernels.quant import QuantScheme, error_bound, quantize
from tiermem.placement import kv_cache_bytes
from tiermem.storage.format import StoreReader

SCHEMES = [QuantScheme(8, 64), QuantScheme(8, 16), QuantScheme(4, 64), QuantScheme(4, 32), QuantScheme(4, 8)]




# ---------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.name}-g{s.group_size}")
def test_round_trip_within_error_bound(scheme):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 64, generator=gen) * torch.logspace(-2, 1, 7)[:, None]  # [B, Hkv, S, Dh]
    codes, scale, zero = quantize_kv(x, scheme)
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (2, 3, 7, 64 * scheme.bits // 8)
    assert scale.dtype == zero.dtype == torch.float16
    assert tuple(scale.shape) == tuple(zero.shape) == (2, 3, 7, 64 // scheme.group_size)
    back = dequantize_kv(codes, scale, zero, scheme, torch.float32)
    assert back.shape == x.shape
    bound = error_bound(x.reshape(-1, 64), scheme).reshape(x.shape)
    assert bool(((back - x).abs() <= bound).all()), f"max excess {float(((back - x).abs() - bound).max()):.3e}"


def test_layout_is_the_weight_layout_of_the_2d_view():
    x = torch.randn(2, 2, 5, 32, generator=torch.Generator().manual_seed(1))
    for scheme in (QuantScheme(8, 16), QuantScheme(4, 32)):
        codes, scale, zero = quantize_kv(x, scheme)
        qw = quantize(x.reshape(-1, 32), scheme)
        assert torch.equal(codes.reshape(-1, codes.shape[-1]), qw.qdata)
        assert torch.equal(scale.reshape(-1, scale.shape[-1]), qw.scale)
        assert torch.equal(zero.reshape(-1, zero.shape[-1]), qw.zero)


def test_int4_packing_low_nibble_first():
    q = torch.randint(0, 16, (3, 2, 4, 16), generator=torch.Generator().manual_seed(2))
    q[..., 0], q[..., 1] = 0, 15  # every group spans 0..15: scale 1, zero 0, codes = values
    codes, scale, zero = quantize_kv(q.to(torch.float32), QuantScheme(4, 16))
    assert bool((scale == 1).all()) and bool((zero == 0).all())
    expect = (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)
    assert torch.equal(codes, expect)
    assert torch.equal(dequantize_kv(codes, scale, zero, QuantScheme(4, 16)), q.to(torch.float32))


def test_kv_scheme_default_group_and_bad_group():
    assert kv_scheme(None, 128) is None
    assert kv_scheme("int8", 128) == QuantScheme(8, 128)
    assert kv_scheme("int4", 128, 32) == QuantScheme(4, 32)
    with pytest.raises(ConfigError):
        kv_scheme("int4", 128, 48)
    with pytest.raises(ConfigError):
        kv_scheme("int2", 128)


# ---------------------------------------------------------------------------------------------- cache


def fake_cfg(layers=2, kv_heads=2, head_dim=32):
    return SimpleNamespace(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim)


def run_attention(cache, steps, heads=4):
    """Prefill 6 tokens then 3 single-token steps, two micro-batches of rows; attention outputs per step."""
    gen = torch.Generator().manual_seed(3)
    B, Hkv, Dh = cache.batch, 2, 32
    outs = []
    for T in steps:
        cache.begin_step(torch.ones(B, T, dtype=torch.bool))
        for layer in range(2):
            for rows in (slice(0, 1), slice(1, B)):
                b = rows.stop - rows.start
                q = torch.randn(b, heads, T, Dh, generator=gen)
                k, v = torch.randn(b, Hkv, T, Dh, generator=gen), torch.randn(b, Hkv, T, Dh, generator=gen)
                K, V = cache.update(layer, rows, k, v)
                assert K.shape == (b, Hkv, cache.length + T, Dh) and K.dtype == torch.float32
                outs.append(F.scaled_dot_product_attention(q, K, V, enable_gqa=True))
        cache.end_step(T)
    return torch.cat([o.flatten() for o in outs])


@pytest.mark.parametrize("scheme,tol", [(QuantScheme(8, 32), 0.02), (QuantScheme(4, 32), 0.25),
                                        (QuantScheme(4, 8), 0.12)], ids=["int8", "int4", "int4-g8"])
def test_quantized_cache_attention_close_to_dense(scheme, tol):
    cfg = fake_cfg()
    dense = KVCache.allocate(cfg, 3, 12)
    quant = KVCache.allocate(cfg, 3, 12, kv_quant=scheme)
    assert quant.kv_quant == scheme and isinstance(quant.keys[0], QuantizedKV) and quant.dtype == torch.float32
    ref = run_attention(dense, [6, 1, 1, 1])
    got = run_attention(quant, [6, 1, 1, 1])
    err = rel_err(got, ref)
    assert err < tol, f"{scheme.name} g{scheme.group_size}: attention max rel error {err:.4f}"


def test_quantized_cache_grow_and_to_keep_the_slots():
    cache = KVCache.allocate(fake_cfg(), 3, 10, kv_quant=QuantScheme(4, 16))
    run_attention(cache, [6, 1])
    before = [k.dequantize(end=cache.length) for k in cache.keys]
    cache.grow(20)
    assert cache.max_len == 20 and cache.keys[0].shape == (3, 2, 20, 32)
    moved = cache.to("cpu")
    for k, b in zip(moved.keys, before, strict=True):
        assert torch.equal(k.dequantize(end=moved.length), b)


@pytest.mark.parametrize("dtype,head_dim,scheme,limit", [
    (torch.float32, 16, QuantScheme(8, 16), 0.6), (torch.float32, 16, QuantScheme(4, 16), 0.35),
    (torch.float16, 128, QuantScheme(8, 128), 0.6), (torch.float16, 128, QuantScheme(4, 128), 0.35),
    (torch.float16, 128, QuantScheme(4, 32), 0.35)])
def test_nbytes_of_quantized_cache(dtype, head_dim, scheme, limit):
    cfg = fake_cfg(layers=3, kv_heads=2, head_dim=head_dim)
    dense = KVCache.allocate(cfg, 2, 40, dtype)
    quant = KVCache.allocate(cfg, 2, 40, dtype, kv_quant=scheme)
    assert dense.nbytes == kv_cache_bytes(cfg, 2, 40, dtype)
    assert quant.nbytes == kv_cache_bytes(cfg, 2, 40, dtype, scheme)
    ratio = quant.nbytes / dense.nbytes
    assert ratio < limit, f"{scheme.name} g{scheme.group_size} vs {dtype}, Dh {head_dim}: ratio {ratio:.3f}"


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return packed_stores(tmp_path_factory.mktemp("kvq-stores"), ("llama3", "opt"))


@pytest.fixture(scope="module")
def batch():
    return left_padded_batch()


NEW = 24
# loose bounds for random-weight tiny models (measured: see benchmarks/results/kv_quant_error.json)
LOGITS_BOUND = {"int8": 0.05, "int4": 0.5}


@pytest.mark.parametrize("variant", ["llama3", "opt"])
def test_end_to_end_logits_and_greedy(stores, batch, variant):
    """int8 / int4 KV against the dense KV: teacher-forced logits over the dense greedy continuation.

    Greedy outputs with int8 KV are identical on opt; on llama3 they diverge at a near tie (dense top-2
    gap 6e-4 below the logits' perturbation of ~9e-3), so there the test checks that the first divergence
    is such a tie and reports the agreement fraction instead of asserting identity.
    """
    ids, mask = batch
    P = ids.shape[1]
    with tiermem.load(stores[variant], max_batch_size=2, max_seq_len=64) as m:
        dense_out = m.generate(ids, NEW, attention_mask=mask, eos_token_id=[])
        full_mask = torch.cat([mask, torch.ones(2, NEW, dtype=mask.dtype)], dim=1)
        ref = cached_logits(m, dense_out, full_mask, P, None)
    real = full_mask.bool()
    for name in ("int8", "int4"):
        with tiermem.load(stores[variant], max_batch_size=2, max_seq_len=64, kv_quant=name) as m:
            assert m.kv_quant == kv_scheme(name, m.config.head_dim)
            logits = cached_logits(m, dense_out, full_mask, P, m.kv_quant)
            out = m.generate(ids, NEW, attention_mask=mask, eos_token_id=[])
        err = rel_err(logits[real], ref[real])
        assert torch.isfinite(logits).all() and err < LOGITS_BOUND[name], f"{variant} {name} KV: rel err {err:.4f}"
        steps = slice(P - 1, P + NEW - 1)  # the logits that chose the generated tokens
        argmax = float((logits[:, steps].argmax(-1) == ref[:, steps].argmax(-1)).float().mean())
        agree = float((out[:, P:] == dense_out[:, P:]).float().mean())
        print(f"{variant} {name} KV: logits max rel err {err:.4f}, teacher-forced argmax agreement {argmax:.3f}, "
              f"greedy agreement {agree:.3f}")
        if name != "int8":
            continue
        assert argmax >= 0.95, f"{variant} int8 KV: teacher-forced argmax agreement {argmax:.3f}"
        if not torch.equal(out, dense_out):
            col = int((out != dense_out).any(0).nonzero()[0])
            r = int((out[:, col] != dense_out[:, col]).nonzero()[0])
            top2 = ref[r, col - 1].topk(2).values
            gap, moved = float(top2[0] - top2[1]), float((logits[r, col - 1] - ref[r, col - 1]).abs().max())
            assert gap < 2 * moved, (f"{variant} int8 KV: greedy agreement {agree:.3f}; first divergence at column "
                                     f"{col} is not a near tie (gap {gap:.2e}, logits moved {moved:.2e})")


def test_load_reserves_the_quantized_kv(stores):
    cfg = model_config_from_hf(StoreReader(stores["llama3"]).model_config)
    for name, group in (("int8", None), ("int4", 8)):
        with tiermem.load(stores["llama3"], max_batch_size=2, max_seq_len=64, kv_quant=name,
                          kv_group_size=group) as m:
            assert m.source.kv_reserved == kv_cache_bytes(cfg, 2, 64, torch.float32, m.kv_quant)
            assert m.source.kv_reserved < 0.35 * kv_cache_bytes(cfg, 2, 64, torch.float32)
            assert m.info()["kv_quant"].startswith(name)
    with pytest.raises(ConfigError):
        tiermem.load(stores["llama3"], kv_quant="int4", kv_group_size=6)


@pytest.mark.parametrize("variant,name", [("llama3", "int8"), ("opt", "int4")])
def test_session_save_restore_of_quantized_cache(stores, batch, variant, name, tmp_path):
    ids, mask = batch
    kw = dict(max_batch_size=2, max_seq_len=64, kv_quant=name)
    with tiermem.load(stores[variant], **kw) as m:
        whole = m.generate(ids, 20, attention_mask=mask, eos_token_id=[])
        session = GenerationSession()
        m.generate(ids, 8, attention_mask=mask, eos_token_id=[], session=session)
    sd = session.state_dict()
    assert sd["kv"]["quant"]["bits"] == int(name[3:]) and sd["kv"]["keys"][0]["codes"].dtype == torch.uint8
    tiermem.checkpoint.save_async(sd, tmp_path / "gen").result()
    restored = GenerationSession.from_state_dict(tiermem.checkpoint.load(tmp_path / "gen"), device="cpu")
    assert restored.cache.kv_quant == session.cache.kv_quant and restored.cache.length == session.cache.length
    for a, b in zip(restored.cache.keys, session.cache.keys, strict=True):
        assert torch.equal(a.codes, b.codes[:, :, :session.cache.length])
    with tiermem.load(stores[variant], **kw) as m:
        out = m.generate(None, 12, session=restored)
    assert torch.equal(out, whole), f"{variant} {name}: restored quantized session diverged"

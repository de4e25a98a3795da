"""The CUDA path: placement under gpu_memory, streaming through the HBM ring, agreement with CPU."""

import pytest
import torch

import tiermem
from tiermem.api import load_from_reader
from tiermem.engine.config import model_config_from_hf
from tiermem.kernels.quant import QuantScheme
from tiermem.placement import kv_cache_bytes, workspace_bytes
from tiermem.presets import preset
from tiermem.synthetic import SyntheticStore, write_hf_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = dict(preset("llama-1b"), hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=4, vocab_size=2048, torch_dtype="float32")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    src = write_hf_checkpoint(SMALL, root / "hf", seed=3)
    return {q: tiermem.pack(src, root / (q or "dense"), quant=q, group_size=64, progress=False)
            for q in (None, "int4")}


def prompts():
    ids = torch.randint(3, 2048, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :5] = 0
    mask[1, :5] = 0
    return ids, mask


@pytest.mark.parametrize("quant", [None, "int4"])
def test_gpu_greedy_equals_cpu_reference(stores, quant):
    ids, mask = prompts()
    with tiermem.load(stores[quant], max_batch_size=2, max_seq_len=64) as cpu:
        ref = cpu.generate(ids, 32, attention_mask=mask, eos_token_id=[])
        ref_logits = cpu.forward(ids, mask)
    with tiermem.load(stores[quant], device="cuda", dtype=torch.float32, max_batch_size=2, max_seq_len=64,
                      resident_weights=0) as gpu:
        assert gpu.info()["streamed_blocks"] > 0
        out = gpu.generate(ids, 32, attention_mask=mask, eos_token_id=[])
        logits = gpu.forward(ids, mask)
    real = mask.bool()
    err = float((logits[real] - ref_logits[real]).abs().max() / ref_logits[real].abs().max())
    assert err < 1e-4, f"GPU fp32 logits differ from CPU by {err:.2e}"
    assert torch.equal(out, ref)


@pytest.mark.parametrize("quant", [None, "int4"])
def test_half_precision_gpu_path_close_to_cpu(stores, quant):
    ids, mask = prompts()
    with tiermem.load(stores[quant], max_batch_size=2, max_seq_len=64) as cpu:
        ref = cpu.forward(ids, mask)
    with tiermem.load(stores[quant], device="cuda", dtype=torch.float16, max_batch_size=2, max_seq_len=64,
                      resident_weights=0) as gpu:
        out = gpu.forward(ids, mask)
    real = mask.bool()
    err = float((out[real] - ref[real]).norm() / ref[real].norm())
    assert torch.isfinite(out[real]).all() and err < 2e-2, f"fp16 GPU logits rel error {err:.2e}"


def test_streamed_equals_resident(stores):
    ids, mask = prompts()
    outs = []
    for resident in (None, 0):
        with tiermem.load(stores["int4"], device="cuda", dtype=torch.float16, max_batch_size=2, max_seq_len=64,
                          resident_weights=resident) as m:
            outs.append((m.info()["streamed_blocks"], m.forward(ids, mask), m.generate(ids, 16, attention_mask=mask,
                                                                                        eos_token_id=[])))
    (streamed_a, logits_a, tokens_a), (streamed_b, logits_b, tokens_b) = outs
    assert streamed_a == 0 and streamed_b > 0
    assert torch.equal(logits_a, logits_b) and torch.equal(tokens_a, tokens_b)


# Gemma 2: its soft-capped attention is written out in torch (engine.attention.grouped_attention), its scores held
GEMMA2 = dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", head_dim=64, query_pre_attn_scalar=64,
              sliding_window=64, tie_word_embeddings=True)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("quant", [None, QuantScheme(4, 64)])
def test_gpu_memory_is_a_hard_limit(quant, family):
    config = dict(SMALL, num_hidden_layers=12, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                  num_key_value_heads=8, torch_dtype="float16", **(GEMMA2 if family == "gemma2" else {}))
    store = SyntheticStore(config, quant, torch.float16, device="cuda")
    total = sum(store.block_nbytes(b) for b in store.block_names)
    cfg = model_config_from_hf(config)
    reserved = kv_cache_bytes(cfg, 4, 160, torch.float16) + workspace_bytes(cfg, 4, 160, 2, torch.float16)
    budget = reserved + total // 2  # KV, activations and half the weights
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    m = load_from_reader(store, "cuda", budget, None, dtype=torch.float16, max_batch_size=4, max_seq_len=160,
                         micro_batches=2, lookahead=2, io_threads=2, resident_weights=None, progress=False)
    try:
        info = m.info()
        assert info["streamed_blocks"] > 0 and info["gpu_resident_blocks"] > 0
        ids = torch.randint(3, config["vocab_size"], (4, 128))
        m.generate(ids, 32, eos_token_id=[], micro_batches=2)
        peak = torch.cuda.max_memory_allocated() - base
        assert peak <= budget, f"peak GPU memory {peak / 2**20:.0f} MiB exceeds gpu_memory {budget / 2**20:.0f} MiB"
    finally:
        m.close()


def test_budget_error_when_the_ring_does_not_fit(stores):
    with pytest.raises(tiermem.BudgetError, match="gpu_memory"):
        tiermem.load(stores[None], device="cuda", gpu_memory="1MiB", max_batch_size=1, max_seq_len=16)


@pytest.mark.parametrize("read_backend", ["posix", "kvikio"])
def test_disk_tier_streams_blocks_that_fit_neither_budget(stores, read_backend):
    """...from the disk, not from the page cache (bench's check: its rates would be the RAM's)."""
    from tiermem.bench import disk_tier_page_cache
    from tiermem.storage.backends.kvikio import kvikio_available
    from tiermem.storage.page_cache import cached_bytes, evict

    if read_backend == "kvikio" and not kvikio_available():
        pytest.skip("needs kvikio")
    ids, mask = prompts()
    with tiermem.load(stores["int4"], device="cuda", dtype=torch.float16, max_batch_size=2, max_seq_len=64,
                      resident_weights=None) as m:
        ref = m.forward(ids, mask)
        ref_tokens = m.generate(ids, 12, attention_mask=mask, eos_token_id=[])
    reader = tiermem.storage.format.StoreReader(stores["int4"])
    sizes = [reader.block_nbytes(b) for b in reader.block_names]
    cpu_memory = reader.block_nbytes("embed") + 3 * max(sizes[1:]) + min(sizes[1:])  # ring + about one block
    with tiermem.load(stores["int4"], device="cuda", dtype=torch.float16, max_batch_size=2, max_seq_len=64,
                      resident_weights=0, cpu_memory=cpu_memory, read_backend=read_backend) as m:
        info = m.info()
        assert info["disk_blocks"] > 0 and info["pinned_host_bytes"] <= cpu_memory
        assert info["read_backend"] == read_backend
        files = [reader.block_file(n) for n in m.source.weights.disk_names]
        evict(files)  # pack just wrote them: out of the page cache, so that only the tier's reads count
        evictable = all(cached_bytes(p) == 0 for p in files)
        out = m.forward(ids, mask)
        tokens = m.generate(ids, 12, attention_mask=mask, eos_token_id=[])
        stager = m.source.weights.disk
        assert stager.bytes_read >= 13 * info["disk_bytes_per_step"]  # every step re-reads the disk blocks
        if evictable:  # not tmpfs
            assert disk_tier_page_cache(m)["disk_blocks_page_cached_fraction"] < 0.05
    assert torch.equal(out, ref) and torch.equal(tokens, ref_tokens)


def test_load_follows_a_planner_placement(stores):
    """load(plan=Plan) places blocks as the plan says."""
    from tiermem.planner import Hardware, Workload, plan
    from tiermem.storage.format import StoreReader

    reader = StoreReader(stores["int4"])
    cfg = model_config_from_hf(reader.model_config)
    sizes = {b: reader.block_nbytes(b) for b in reader.block_names}
    hw = Hardware(disk_read_Bps=1.3e9, h2d_Bps=55e9, hbm_Bps=4e12, matmul_flops=6e14, cpu_memcpy_Bps=1e10)
    workload = Workload.from_config(cfg, sizes, batch=2, prompt_len=12, gen_len=12, dtype=torch.float16,
                                    quantized=True)
    gpu_memory = 512 << 20
    chosen = plan(workload, hw, gpu_memory, 1 << 30, kv="gpu", gpu_blocks=2, lookahead=2)
    ids, mask = prompts()
    with tiermem.load(stores["int4"], device="cuda", dtype=torch.float16, max_batch_size=2, max_seq_len=24,
                      gpu_memory=gpu_memory, plan=chosen) as m:
        assert m.info()["gpu_resident_blocks"] == 2
        out = m.generate(ids, 12, attention_mask=mask, eos_token_id=[])
    with tiermem.load(stores["int4"], device="cuda", dtype=torch.float16, max_batch_size=2, max_seq_len=24) as m:
        assert torch.equal(out, m.generate(ids, 12, attention_mask=mask, eos_token_id=[]))

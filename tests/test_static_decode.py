"""engine.static_decode: decode steps of fixed shape (what a CUDA graph captures) against Executor.forward."""

import pytest
import torch
from hf_models import left_padded_batch, longer_batch, packed_stores

import tiermem
from tiermem.engine.kv_cache import KVCache
from tiermem.engine.static_decode import StaticDecoder
from tiermem.errors import ConfigError
from tiermem.kernels.kv_quant import kv_scheme
from tiermem.pinned import CUDA_MEMORY_TYPE_HOST


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return packed_stores(tmp_path_factory.mktemp("static-decode"), ("llama3", "mistral", "opt", "opt-proj",
                                                                    "llama-tied", "qwen3", "qwen2-yarn", "mixtral",
                                                                    "qwen2-moe", "qwen3-moe", "phi3-longrope",
                                                                    "phi3-partial", "llama-dynamic", "gemma2",
                                                                    "gemma3"))


def _twin_caches(m, ids, mask, max_len, kv_quant=None):
    """Two caches after the same prompt."""
    scheme = kv_scheme(kv_quant, m.config.head_dim)
    caches = [KVCache.allocate(m.config, ids.shape[0], max_len, m.dtype, m.device, kv_quant=scheme)
              for _ in range(2)]
    for c in caches:
        m.executor.forward(ids, mask, c)
    return caches


def _compare_steps(m, steps: int, bucket: int, graphs: bool = False, atol: float = 1e-5, rtol: float = 1e-5,
                   kv_quant: str | None = None, decoder_class=StaticDecoder):
    ids, mask = left_padded_batch()
    ids, mask = ids.to(m.device), mask.to(m.device)
    ref_cache, cache = _twin_caches(m, ids, mask, 40, kv_quant)
    decoder = decoder_class(m.executor, cache, bucket=bucket, graphs=graphs)
    token = ids[:, -1:]
    for t in range(steps):
        new_mask = torch.ones_like(token)
        ref = m.executor.forward(token, new_mask, ref_cache)
        out = decoder.forward(token, new_mask)
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=f"step {t}")
        token = ref[:, -1].argmax(-1, keepdim=True)
    assert cache.length == ref_cache.length == ids.shape[1] + steps
    filled = cache.length
    for a, b in zip([*cache.keys, *cache.values], [*ref_cache.keys, *ref_cache.values], strict=True):
        for x, y in zip(*((t.tensors if kv_quant else (t,)) for t in (a, b)), strict=True):
            torch.testing.assert_close(x[:, :, :filled], y[:, :, :filled], atol=atol, rtol=rtol)
    return decoder


@pytest.mark.parametrize("variant", ["llama3", "mistral", "opt", "opt-proj", "llama-tied", "qwen3", "qwen2-yarn",
                                     "mixtral", "qwen2-moe", "qwen3-moe", "phi3-longrope", "phi3-partial",
                                     "llama-dynamic", "gemma2", "gemma3"])
def test_static_steps_give_the_logits_and_cache_of_dynamic_steps(stores, variant):
    """Left padding, GQA, llama3 RoPE (llama3), a sliding window shorter than the context (mistral: 16 slots, 22
    tokens), learned positions (opt), embeddings narrower than the layers (opt-proj), a tied head (llama-tied),
    per-head q/k norms (qwen3), YaRN's scaled cos/sin (qwen2-yarn); a bucket of 4 slots crosses span boundaries."""
    with tiermem.load(stores[variant], max_batch_size=2, max_seq_len=64) as m:
        decoder = _compare_steps(m, 12, bucket=4)
    assert [decoder.span(n) for n in (9, 10, 11, 12, 39)] == [12, 12, 12, 16, 40]


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_static_steps_over_a_quantized_cache_write_and_attend_as_dynamic_steps(stores, kv_quant):
    """The new K and V quantized as the dynamic step quantizes them (the codes, scales and zeros equal), attention
    over the span dequantized."""
    with tiermem.load(stores["llama3"], max_batch_size=2, max_seq_len=64) as m:
        _compare_steps(m, 12, bucket=4, kv_quant=kv_quant)


def test_static_decode_refuses_what_it_cannot_run(stores):
    from tiermem.kv_offload import HostKVCache

    with tiermem.load(stores["llama3"], max_batch_size=2, max_seq_len=64) as m:
        with pytest.raises(ConfigError, match="not offloaded"):
            StaticDecoder(m.executor, HostKVCache.allocate(m.config, 2, 32, m.dtype))
        cache = KVCache.allocate(m.config, 2, 32, m.dtype)
        with pytest.raises(ConfigError, match="device='cuda'"):
            StaticDecoder(m.executor, cache, graphs=True)
        with pytest.raises(ConfigError, match="bucket"):
            StaticDecoder(m.executor, cache, bucket=0)
        decoder = StaticDecoder(m.executor, cache)
        with pytest.raises(ConfigError, match=r"input_ids \[2, 1\]"):
            decoder.forward(torch.ones(2, 3, dtype=torch.long))
        cache.grow(48)
        with pytest.raises(ConfigError, match="changed"):
            decoder.forward(torch.ones(2, 1, dtype=torch.long))


class CapturingDecoder(StaticDecoder):
    """A StaticDecoder that records the span of each graph it captures."""

    def _capture(self, span):
        self.spans = [*getattr(self, "spans", []), span]
        return super()._capture(span)


def _check_captures(decoder: CapturingDecoder) -> None:
    """One capture per span of the run (the prompt's 10 slots, 12 steps, spans of 4), and only the last one kept."""
    assert decoder.spans == [12, 16, 20, 24]
    assert isinstance(decoder.graph(24), torch.cuda.CUDAGraph)
    with pytest.raises(KeyError):
        decoder.graph(20)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["llama3", "opt", "qwen3", "qwen2-yarn", "mixtral", "qwen3-moe", "phi3-longrope",
                                     "phi3-partial", "llama-dynamic", "gemma2", "gemma3"])
def test_gpu_graph_replays_give_the_logits_of_dynamic_steps(stores, variant):
    """Every block resident: the first step of each span runs as it is and is captured, the others replay it. A
    capture runs every MoE expert (engine.moe.all_experts); qwen3-moe's dynamic steps, 2 rows x 2 picks of 6
    experts, run only the chosen ones."""
    with tiermem.load(stores[variant], device="cuda", dtype=torch.float32, max_batch_size=2, max_seq_len=64) as m:
        _check_captures(_compare_steps(m, 12, bucket=4, graphs=True, atol=1e-4, decoder_class=CapturingDecoder))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_gpu_graph_replays_over_a_quantized_cache_give_the_logits_of_dynamic_steps(stores, kv_quant):
    """The fused attention kernel over the graph's span, told the query's slot on the GPU, against the dynamic step's
    call of it over the filled slots (a different split of the sequence: fp32 sums in another order)."""
    with tiermem.load(stores["llama3"], device="cuda", dtype=torch.float32, max_batch_size=2, max_seq_len=64) as m:
        _check_captures(_compare_steps(m, 12, bucket=4, graphs=True, atol=1e-4, kv_quant=kv_quant,
                                       decoder_class=CapturingDecoder))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["llama3", "mixtral-8experts", "mixtral"])
def test_gpu_graph_replays_of_int4_weights_in_bf16_give_the_logits_of_dynamic_steps(tmp_path, variant, monkeypatch):
    """The bench's path: int4 weights and bf16 compute, so that the CuPy kernels (GEMV, RMSNorm, RoPE, SiLU) are
    what the graph captures; the static steps attend over more (masked) slots, so bf16 sums may differ slightly.
    mixtral-8experts: 2 rows x 2 picks of 8 experts, the routed GEMV (routed_experts) in the dynamic steps and in
    the captures (the choice read on the GPU at every replay); mixtral: 4 picks of 4 experts, every expert over both
    rows in two launches of it (all_experts)."""
    from hf_models import build_tiny

    from tiermem.engine import moe

    routed = []  # per call of engine.moe.routed_experts: whether a capture made it
    run = moe.routed_experts

    def recorded(*args):
        routed.append(torch.cuda.is_current_stream_capturing())
        return run(*args)

    monkeypatch.setattr(moe, "routed_experts", recorded)
    store = tiermem.pack(build_tiny(variant, tmp_path / "hf"), tmp_path / "int4", quant="int4", group_size=32,
                         progress=False)
    with tiermem.load(store, device="cuda", dtype=torch.bfloat16, max_batch_size=2, max_seq_len=64) as m:
        routed.clear()  # the load's host probe ran (and captured) a narrow copy of the model
        _check_captures(_compare_steps(m, 12, bucket=4, graphs=True, atol=3e-2, rtol=3e-2,
                                       decoder_class=CapturingDecoder))
    sparse = m.config.moe.sparse_layers.count(True) if variant == "mixtral-8experts" else 0
    assert routed.count(True) == 4 * sparse  # every capture (4 spans)
    assert routed.count(False) == (12 + 4) * sparse  # the reference's 12 steps, the decoder's first step of each span


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graphs_need_every_block_in_hbm(stores):
    with tiermem.load(stores["llama3"], device="cuda", max_batch_size=2, max_seq_len=64, resident_weights=0) as m:
        cache = KVCache.allocate(m.config, 2, 32, m.dtype, m.device)
        with pytest.raises(ConfigError, match="resident in HBM"):
            StaticDecoder(m.executor, cache, graphs=True)


class CountingDecoder(StaticDecoder):
    """A StaticDecoder that records the cache length at each of its steps."""

    def forward(self, input_ids, attention_mask=None):
        self.steps = [*getattr(self, "steps", []), self.cache.length]
        return super().forward(input_ids, attention_mask)


def test_decode_runs_its_one_token_steps_through_a_step_decoder(stores):
    """engine.generate.decode with step_decoder (what generate passes with cuda_graphs): the prompt through the
    executor, every one-token step through the decoder, the tokens of a decode without it."""
    from tiermem.engine.generate import DecodeState, Sampling, decode

    ids, mask = left_padded_batch()
    with tiermem.load(stores["llama3"], max_batch_size=2, max_seq_len=64) as m:
        plain = DecodeState.start(ids, mask, KVCache.allocate(m.config, 2, 32, m.dtype))
        decode(m.executor, plain, Sampling.make(eos_token_id=[]), 8)
        state = DecodeState.start(ids, mask, KVCache.allocate(m.config, 2, 32, m.dtype))
        decoder = CountingDecoder(m.executor, state.cache, bucket=8)
        decode(m.executor, state, Sampling.make(eos_token_id=[]), 8, step_decoder=decoder)
    assert torch.equal(state.tokens, plain.tokens)
    assert decoder.steps == list(range(10, 17))  # the 7 one-token steps after the prompt's 10 slots


def test_cuda_graphs_is_a_gpu_option(stores):
    with pytest.raises(ConfigError, match="device='cuda'"):
        tiermem.load(stores["llama3"], cuda_graphs=True)
    with tiermem.load(stores["llama3"]) as m:  # the default, "auto": never on the CPU
        assert m.info()["cuda_graphs"] is False
    with pytest.raises(ConfigError, match="True, False or 'auto'"):
        tiermem.load(stores["llama3"], cuda_graphs="yes")


def test_plans_whose_steps_can_be_graph_replays():
    """placement.graphable: every block in HBM but the host-only embedding, the KV cache there, whole-batch steps."""
    from tiermem.placement import graphable
    from tiermem.planner import Plan

    def plan(**kw):
        fields = dict(gpu_blocks=("layers.0", "head"), host_blocks=(), disk_blocks=(), host_only=("embed",))
        return Plan(**{**fields, **kw})

    assert graphable(plan())
    for kw in (dict(host_blocks=("layers.0",)), dict(disk_blocks=("head",)), dict(kv="cpu"), dict(kv="disk"),
               dict(micro_batches=2), dict(kv="cpu", cpu_cache_compute=True)):
        assert not graphable(plan(**kw)), kw


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_generate_with_cuda_graphs_gives_the_tokens_without(stores):
    ids, mask = left_padded_batch()
    kw = dict(device="cuda", dtype=torch.float32, max_batch_size=2, max_seq_len=64)
    with tiermem.load(stores["llama3"], cuda_graphs=False, **kw) as m:
        assert not m.info()["cuda_graphs"]
        ref = m.generate(ids, 20, attention_mask=mask, eos_token_id=[])
    with tiermem.load(stores["llama3"], cuda_graphs=True, **kw) as m:
        assert m.info()["cuda_graphs"]
        assert torch.equal(m.generate(ids, 20, attention_mask=mask, eos_token_id=[]), ref)
    with tiermem.load(stores["llama3"], cuda_graphs=True, kv_quant="int4", **kw) as m:
        quantized = m.generate(ids, 20, attention_mask=mask, eos_token_id=[])
    with tiermem.load(stores["llama3"], cuda_graphs=False, kv_quant="int4", **kw) as m:
        assert torch.equal(m.generate(ids, 20, attention_mask=mask, eos_token_id=[]), quantized)
    for bad in (dict(resident_weights=0), dict(kv_placement="cpu")):
        with pytest.raises(ConfigError, match="cuda_graphs|CUDA graphs"):
            tiermem.load(stores["llama3"], cuda_graphs=True, **kw, **bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["llama3", "opt"])
def test_gpu_replayed_steps_gather_the_embedding_from_pinned_memory_and_never_wait_for_the_gpu(stores, variant):
    """The embedding stays in pinned host memory (host-only) and the graph reads its rows there. In a second
    generation of the batch, which replays the first one's graph, every decode step after the prompt issues its
    replay and samples without one host sync (torch's sync debug mode raises on any)."""
    ids, mask = left_padded_batch()
    with tiermem.load(stores[variant], device="cuda", dtype=torch.float32, max_batch_size=2, max_seq_len=64,
                      cuda_graphs=True) as m:
        weights = m.executor.source.weights
        assert "embed" in weights.host_only and "embed" not in weights.resident
        for table in weights.device_views("embed").values():
            assert table.is_cuda and _memory_type(table) == CUDA_MEMORY_TYPE_HOST
        ref = m.generate(ids, 12, attention_mask=mask, eos_token_id=[])

        def on_step(k):
            torch.cuda.set_sync_debug_mode("error" if k < 12 else "default")

        try:
            assert torch.equal(m.generate(ids, 12, attention_mask=mask, eos_token_id=[], on_step=on_step), ref)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_generations_of_one_batch_replay_the_graph_of_the_last_one(stores):
    """The KV cache and graph of a generation are kept for the next one of the same batch that fits the cache: one
    over the same span replays that graph (no capture), over the cache the last one left filled (a longer prompt,
    then other rows: nothing of it shows in the tokens); another batch replaces them; a call split into
    micro-batches, one with a session, and close() let them go."""
    from tiermem import GenerationSession

    kw = dict(device="cuda", dtype=torch.float32, max_batch_size=2, max_seq_len=64)
    long_ids, long_mask = longer_batch(6)  # 16 tokens
    ids, mask = left_padded_batch()
    other = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(9))
    one = ids[:1]
    with tiermem.load(stores["llama3"], cuda_graphs=False, **kw) as m:
        want = [m.generate(a, 12, attention_mask=b, eos_token_id=[])
                for a, b in ((long_ids, long_mask), (ids, mask), (other, None), (one, None))]
    with tiermem.load(stores["llama3"], cuda_graphs=True, **kw) as m:
        assert torch.equal(m.generate(long_ids, 12, attention_mask=long_mask, eos_token_id=[]), want[0])
        kept = m._graphs
        graph = kept.graph(kept.span(long_ids.shape[1]))  # the cache's 28 slots
        assert torch.equal(m.generate(ids, 12, attention_mask=mask, eos_token_id=[]), want[1])
        assert torch.equal(m.generate(other, 12, eos_token_id=[]), want[2])
        assert m._graphs is kept and kept.graph(kept.span(long_ids.shape[1])) is graph  # replayed, not captured
        assert torch.equal(m.generate(one, 12, eos_token_id=[]), want[3])
        assert m._graphs is not kept and m._graphs.cache.batch == 1
        assert torch.equal(m.generate(one, 12, eos_token_id=[], micro_batches=2), want[3])
        assert m._graphs is None
        assert torch.equal(m.generate(other, 12, eos_token_id=[]), want[2])
        assert m._graphs is not None
        assert torch.equal(m.generate(other, 12, eos_token_id=[], session=GenerationSession()), want[2])
        assert m._graphs is None
        assert torch.equal(m.generate(other, 12, eos_token_id=[]), want[2])
    assert m._graphs is None


def test_generate_keeps_the_static_decoder_and_cache_for_the_next_call_of_the_batch(stores, monkeypatch):
    """Model.generate's bookkeeping of kept graphs, on the CPU: the model told it replays graphs, its decoders run
    their steps as they are (graphs=False). A call of the same batch that fits the cache reuses decoder and cache,
    with the tokens of a load without graphs; another batch replaces them; micro-batches, a session and close() let
    them go."""
    import tiermem.api
    from tiermem import GenerationSession

    made = []

    class EagerDecoder(StaticDecoder):
        def __init__(self, executor, cache, graphs=False):
            super().__init__(executor, cache)
            made.append(self)

    ids, mask = left_padded_batch()
    other = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(9))
    with tiermem.load(stores["llama3"], max_batch_size=2, max_seq_len=64) as m:
        want = [m.generate(a, 12, attention_mask=b, eos_token_id=[]) for a, b in ((ids, mask), (other, None))]
        want_one = m.generate(ids[:1], 12, eos_token_id=[])
        monkeypatch.setattr(tiermem.api, "StaticDecoder", EagerDecoder)
        m.cuda_graphs = True
        assert torch.equal(m.generate(ids, 12, attention_mask=mask, eos_token_id=[]), want[0])
        kept = m._graphs
        assert made == [kept] and kept.cache.max_len == 22
        assert torch.equal(m.generate(other, 8, eos_token_id=[]), want[1][:, :18])  # fits the 22 slots
        assert m._graphs is kept and len(made) == 1
        assert torch.equal(m.generate(other, 12, eos_token_id=[]), want[1])
        assert m._graphs is kept and len(made) == 1
        assert torch.equal(m.generate(ids[:1], 12, eos_token_id=[]), want_one)
        assert m._graphs is made[-1] and m._graphs.cache.batch == 1 and len(made) == 2
        assert torch.equal(m.generate(ids[:1], 12, eos_token_id=[], micro_batches=2), want_one)
        assert m._graphs is None and len(made) == 2  # split steps run through the executor
        m.generate(other, 12, eos_token_id=[])
        assert m._graphs is made[-1]
        assert torch.equal(m.generate(other, 12, eos_token_id=[], session=GenerationSession()), want[1])
        assert m._graphs is None and len(made) == 4  # the session's own decoder, not kept
        m.generate(other, 12, eos_token_id=[])
        assert m._graphs is made[-1]
    assert m._graphs is None


def _memory_type(t: torch.Tensor) -> int:
    """cudaPointerAttributes.type of t's memory (1: host, 2: device)."""
    import cupy

    return cupy.cuda.runtime.pointerGetAttributes(t.data_ptr()).type


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphs_are_the_default_where_the_placement_allows_them(stores):
    """cuda_graphs="auto": on for a model that fits HBM with its KV cache (planned or greedy), off where blocks
    stream, the KV cache is offloaded or steps are split; the tokens are those of steps run as they are, and a
    generate call split into micro-batches runs its steps as they are."""
    ids, mask = left_padded_batch()
    kw = dict(device="cuda", dtype=torch.float32, max_batch_size=2, max_seq_len=64)
    with tiermem.load(stores["llama3"], cuda_graphs=False, **kw) as m:
        ref = m.generate(ids, 12, attention_mask=mask, eos_token_id=[])
    for plan in ("auto", None):
        with tiermem.load(stores["llama3"], plan=plan, **kw) as m:
            assert m.info()["cuda_graphs"], plan
            assert torch.equal(m.generate(ids, 12, attention_mask=mask, eos_token_id=[]), ref)
            assert torch.equal(m.generate(ids, 12, attention_mask=mask, eos_token_id=[], micro_batches=2), ref)
    for eager in (dict(resident_weights=0), dict(kv_placement="cpu"), dict(micro_batches=2)):
        with tiermem.load(stores["llama3"], **kw, **eager) as m:
            assert not m.info()["cuda_graphs"], eager
            assert torch.equal(m.generate(ids, 12, attention_mask=mask, eos_token_id=[]), ref)


def test_cuda_graphs_options_are_checked_before_anything_loads():
    from tiermem.api import _check_graph_options

    _check_graph_options("gpu", False, 1)
    for bad in (("cpu", None, None), ("disk", None, None), (None, True, None), (None, None, 2)):
        with pytest.raises(ConfigError, match="cuda_graphs replays whole-batch decode steps"):
            _check_graph_options(*bad)


def test_graphs_take_the_embedding_from_pinned_host_memory_but_every_later_block_from_hbm():
    """check_resident: the graph gathers the embedding's rows where the GPU reads the block in place (HBM, or pinned
    host memory it maps); a tied output projection that reuses the embedding block, or any streamed layer, would be
    a copy inside it."""
    from types import SimpleNamespace

    from tiermem.engine.static_decode import check_resident

    def executor(order, resident, host_only=("embed",), mappable=True):
        def device_views(name):
            return {} if name in resident or (name in host_only and mappable) else None

        weights = SimpleNamespace(resident=set(resident), host_only=frozenset(host_only), device_views=device_views)
        return SimpleNamespace(block_order=order, source=SimpleNamespace(weights=weights))

    check_resident(executor(["embed", "layers.0", "head"], ["layers.0", "head"]))
    check_resident(executor(["embed", "layers.0", "head"], ["embed", "layers.0", "head"], host_only=()))
    for order, resident in ((["embed", "layers.0", "head", "embed"], ["layers.0", "head"]),
                            (["embed", "layers.0", "layers.1", "head"], ["layers.0", "head"])):
        with pytest.raises(ConfigError, match="1 blocks of this placement are streamed"):
            check_resident(executor(order, resident))
    with pytest.raises(ConfigError, match="resident in HBM"):
        check_resident(SimpleNamespace(block_order=["embed", "head"], source=SimpleNamespace()))
    with pytest.raises(ConfigError, match="cannot map the pinned host memory of block 'embed'"):
        check_resident(executor(["embed", "layers.0", "head"], ["layers.0", "head"], mappable=False))


def test_bench_cuda_graphs_on_the_cpu_is_a_clear_error(capsys):
    from tiermem.cli import main

    assert main(["bench", "--synthetic", "tiny-llama", "--device", "cpu", "--cuda-graphs"]) == 2
    assert "use device='cuda'" in capsys.readouterr().err

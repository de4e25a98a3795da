"""Mixtral and Qwen3-MoE: configs as the hub writes them, the router and experts against transformers, fused
expert checkpoints, and which experts a step reads."""

import json
import math
from collections import Counter

import pytest
import torch
from hf_models import build_model, build_tiny, left_padded_batch, load_tiny, rel_err
from safetensors.torch import save_file

import tiermem
from tiermem.api import store_info
from tiermem.engine import moe
from tiermem.engine.config import expected_weights, model_config_from_hf
from tiermem.errors import ConfigError
from tiermem.kernels.quant import QuantizedWeight, QuantScheme, quantize
from tiermem.storage.format import StoreReader
from tiermem.storage.hf import HFCheckpoint
from tiermem.storage.pack import default_should_quantize

transformers = pytest.importorskip("transformers")

# config.json of mistralai/Mixtral-8x7B-v0.1 (transformers 4.36) and Qwen/Qwen3-30B-A3B (4.51), weights not needed
MIXTRAL_8X7B = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
                    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=32768,
                    rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, torch_dtype="bfloat16",
                    router_aux_loss_coef=0.02, output_router_logits=False, bos_token_id=1, eos_token_id=2)
QWEN3_30B_A3B = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                     intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                     norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
                     max_position_embeddings=40960, max_window_layers=48, use_sliding_window=False,
                     sliding_window=None, rms_norm_eps=1e-6, rope_theta=1e6, torch_dtype="bfloat16",
                     tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)

QWEN15_MOE_A27B = dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", hidden_size=2048,
                       intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                       num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, num_experts=60,
                       num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, vocab_size=151936,
                       max_position_embeddings=8192, use_sliding_window=False, sliding_window=32768,
                       max_window_layers=21, rms_norm_eps=1e-6, rope_theta=1e6, torch_dtype="bfloat16",
                       tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643)


def parameters(cfg) -> int:
    return sum(math.prod(shape) for block in expected_weights(cfg).values() for shape in block.values())


def test_hub_configs_read_as_their_transformers_classes_do():
    mixtral = model_config_from_hf(MIXTRAL_8X7B)
    assert mixtral.moe == moe.MoeConfig(8, 2, 14336, True, (True,) * 32, "mixtral")
    assert mixtral.rope.theta == 1e6 and mixtral.sliding_windows == (None,) * 32 and not mixtral.qk_norm
    assert parameters(mixtral) / 1e9 == pytest.approx(46.7, rel=0.01)
    qwen = model_config_from_hf(QWEN3_30B_A3B)
    assert qwen.moe == moe.MoeConfig(128, 8, 768, True, (True,) * 48, "qwen") and qwen.qk_norm
    assert parameters(qwen) / 1e9 == pytest.approx(30.5, rel=0.01)
    sparse_every_other = model_config_from_hf(dict(QWEN3_30B_A3B, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert sparse_every_other.moe.sparse_layers[:6] == (False, True, False, False, False, True)
    assert "model.layers.0.mlp.up_proj.weight" in expected_weights(sparse_every_other)["layers.0"]
    qwen2 = model_config_from_hf(QWEN15_MOE_A27B)  # Qwen1.5-MoE-A2.7B: 60 experts and a shared one
    assert qwen2.moe == moe.MoeConfig(60, 4, 1408, False, (True,) * 24, "qwen", 5632) and qwen2.qkv_bias
    assert parameters(qwen2) / 1e9 == pytest.approx(14.3, rel=0.01)
    with pytest.raises(tiermem.UnsupportedArchitectureError, match="use_sliding_window"):
        model_config_from_hf(dict(QWEN15_MOE_A27B, use_sliding_window=True))
    five = dict(QWEN3_30B_A3B, num_local_experts=64)  # transformers 5 writes num_local_experts
    del five["num_experts"]
    assert model_config_from_hf(five).moe.num_experts == 64


@pytest.mark.parametrize(("change", "words"), [
    (dict(num_experts_per_tok=9), "num_experts_per_tok 9 is more than the 8 experts"),
    (dict(num_local_experts=0), "num_experts must be a positive integer"),
    (dict(num_experts_per_tok=None), "num_experts_per_tok is null"),
])
def test_bad_moe_configs_raise(change, words):
    with pytest.raises(ConfigError, match=words):
        model_config_from_hf(dict(MIXTRAL_8X7B, **change))


def test_routers_are_never_quantized():
    assert not default_should_quantize("model.layers.0.block_sparse_moe.gate.weight", (8, 4096))
    assert not default_should_quantize("model.layers.0.mlp.gate.weight", (128, 2048))
    assert not default_should_quantize("model.layers.0.mlp.shared_expert_gate.weight", (1, 2048))
    assert default_should_quantize("model.layers.0.mlp.shared_expert.up_proj.weight", (5632, 2048))
    assert default_should_quantize("model.layers.0.block_sparse_moe.experts.3.w1.weight", (14336, 4096))
    assert default_should_quantize("model.layers.0.mlp.gate_proj.weight", (14336, 4096))


class Recording(dict):
    """A weight dict that records the names read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)


def moe_layer(top_k=2, experts=6, normalize=False, hidden=16, inter=24):
    cfg = moe.MoeConfig(experts, top_k, inter, normalize, (True,), "qwen")
    gen = torch.Generator().manual_seed(3)
    w = Recording({name: 0.3 * torch.randn(shape, generator=gen)
                   for name, shape in moe.weight_shapes(cfg, "p.", hidden).items()})
    return cfg, w


@pytest.mark.parametrize("tokens", [2, 40])
def test_a_step_of_few_picks_or_many_rows_reads_only_the_experts_its_tokens_chose(tokens):
    cfg, w = moe_layer()
    router = w["p.mlp.gate.weight"]
    router[4] = -10 * router[:4].abs().sum(0)  # expert 4 never wins for x > 0 ...
    router[5] = router[4]  # ... nor 5
    x = torch.rand(1, tokens, 16) + 0.1
    w.read.clear()
    out = moe.sparse_mlp(cfg, "p.", w, x)
    read_experts = {int(n.split(".")[3]) for n in w.read if ".experts." in n}
    assert read_experts <= {0, 1, 2, 3} and out.shape == x.shape and torch.isfinite(out).all()


def test_decode_rows_whose_picks_cover_the_experts_run_them_all_without_a_host_sync():
    cfg = moe.MoeConfig(8, 2, 24, True, (True,), "mixtral")
    rows = {n: moe.takes_all_experts(cfg, torch.zeros(n, 4)) for n in (1, 3, 4, 16, 32, 33, 512)}
    assert rows == {1: False, 3: False, 4: True, 16: True, 32: True, 33: False, 512: False}
    wide = moe.MoeConfig(128, 8, 24, True, (True,), "qwen")
    assert not moe.takes_all_experts(wide, torch.zeros(8, 4)) and moe.takes_all_experts(wide, torch.zeros(16, 4))


@pytest.mark.parametrize("normalize", [False, True])
def test_every_expert_on_every_token_weighted_by_0_gives_the_chosen_experts_result(normalize):
    """What a CUDA graph capture runs (no host sync, no routing-dependent shape) equals the eager dispatch."""
    cfg, w = moe_layer(normalize=normalize)
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(4))
    weights, experts = moe.route(cfg, w["p.mlp.gate.weight"], x)
    assert weights.shape == experts.shape == (11, 2)
    if normalize:
        assert torch.allclose(weights.sum(-1), torch.ones(11))
    grouped = moe.chosen_experts(cfg, "p.", w, x, weights, experts)
    dense = moe.all_experts(cfg, "p.", w, x, weights, experts)
    assert rel_err(dense, grouped) <= 1e-6


@pytest.mark.parametrize("quantized", [False, True])
def test_each_pick_through_its_expert_gives_the_chosen_experts_result(quantized):
    """routed_experts (the choice never read on the host where the routed GEMV runs; ops.routed_linear's reference
    here) equals the eager dispatch, an expert picked by two tokens included."""
    cfg, w = moe_layer(normalize=True)
    if quantized:
        w = {n: quantize(v, QuantScheme(4, 8)) if ".experts." in n else v for n, v in w.items()}
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    weights, experts = moe.route(cfg, w["p.mlp.gate.weight"], x)
    routed = moe.routed_experts(cfg, "p.", w, x, weights, experts)
    assert routed.shape == x.shape and routed.dtype == torch.float32
    assert rel_err(routed, moe.chosen_experts(cfg, "p.", w, x, weights, experts)) <= 1e-6


@pytest.mark.parametrize(("tokens", "path"), [(2, "routed_experts"), (3, "all_experts"), (40, "chosen_experts")])
def test_a_sparse_layer_looks_its_experts_and_tables_up_once(tokens, path, monkeypatch):
    """sparse_mlp's dispatch as on the GPU, its routed GEMV stood in for by the reference (ops.routed_gemv_takes
    any x, ops.routed_table gives a table for any weights): 2 tokens x 2 picks of 6 experts take routed_experts, 3
    tokens (6 picks) all_experts in its routed launches, 40 chosen_experts; one table lookup per matrix set and one
    read of each expert weight per layer, and the chosen experts' result."""
    from tiermem.kernels import ops, reference

    lookups = []  # the number of matrices of each table looked up

    def table(x, matrices):
        lookups.append(len(matrices))
        return "table"

    def routed_linear(x, matrices, experts, x_div, rows=1, table=None):
        assert table == "table", "the looked-up table is passed, not looked up again"
        return reference.routed_linear(x, matrices, experts, x_div, rows)

    ran = []

    def recording(name):
        run = getattr(moe, name)
        return lambda *args: ran.append(name) or run(*args)

    monkeypatch.setattr(ops, "routed_gemv_takes", lambda x: True)
    monkeypatch.setattr(ops, "routed_table", table)
    monkeypatch.setattr(ops, "routed_linear", routed_linear)
    for name in ("routed_experts", "all_experts", "chosen_experts"):
        monkeypatch.setattr(moe, name, recording(name))

    class Counting(dict):
        def __init__(self, *args):
            super().__init__(*args)
            self.reads = Counter()

        def __getitem__(self, name):
            self.reads[name] += 1
            return super().__getitem__(name)

    cfg, w = moe_layer()
    w = Counting(w)
    x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(tokens))
    out = moe.sparse_mlp(cfg, "p.", w, x)
    assert ran == [path]
    assert lookups == ([2, 1] if path != "chosen_experts" else [])
    if path != "chosen_experts":
        assert {n: c for n, c in w.reads.items() if ".experts." in n and c != 1} == {}
        assert sum(".experts." in n for n in w.reads) == 3 * 6
    flat = x.reshape(tokens, 16)
    weights, experts = moe.route(cfg, w["p.mlp.gate.weight"], flat)
    assert rel_err(out.reshape(tokens, 16), moe.chosen_experts(cfg, "p.", dict(w), flat, weights, experts)) <= 1e-6


def test_decode_steps_of_fewer_picks_than_experts_are_the_routed_ones():
    mixtral = moe.MoeConfig(8, 2, 24, True, (True,), "mixtral")
    assert {n: moe.picks_fewer_than_experts(mixtral, n) for n in (1, 3, 4, 32)} == {1: True, 3: True, 4: False,
                                                                                   32: False}
    qwen3 = moe.MoeConfig(128, 8, 24, True, (True,), "qwen")
    assert moe.picks_fewer_than_experts(qwen3, 15) and not moe.picks_fewer_than_experts(qwen3, 16)
    many = moe.MoeConfig(512, 2, 24, True, (True,), "qwen")  # beyond 32 rows the fused GEMV is not what runs
    assert moe.picks_fewer_than_experts(many, 32) and not moe.picks_fewer_than_experts(many, 33)
    cfg, w = moe_layer()
    assert not moe.takes_routed_experts(cfg, "p.", w, torch.zeros(1, 16))  # on the CPU: chosen_experts


def stored_parts(value):
    return (value.qdata, value.scale, value.zero) if isinstance(value, QuantizedWeight) else (value,)


def fused_checkpoint(variant, directory):
    """The variant's transformers 5 in-memory state dict (fused experts) saved as it is, with its config."""
    model = build_model(variant)
    directory.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state), "transformers no longer fuses the experts"
    save_file(state, directory / "model.safetensors")
    model.config.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_a_fused_expert_checkpoint_packs_to_the_same_store_as_the_hub_layout(variant, tmp_path):
    hub = build_tiny(variant, tmp_path / "hub")
    fused = fused_checkpoint(variant, tmp_path / "fused")
    assert set(HFCheckpoint(fused).tensor_names) == set(HFCheckpoint(hub).tensor_names)
    for quant in (None, "int4"):
        stores = [StoreReader(tiermem.pack(src, tmp_path / f"{src.name}-{quant}", quant=quant, group_size=16,
                                           progress=False)) for src in (hub, fused)]
        assert stores[0].block_names == stores[1].block_names
        for block in stores[0].block_names:
            hub_tensors, fused_tensors = (store.load_block(block) for store in stores)
            assert hub_tensors.keys() == fused_tensors.keys()
            for name, value in hub_tensors.items():
                assert all(map(torch.equal, stored_parts(value), stored_parts(fused_tensors[name]))), name
    ids, mask = left_padded_batch()
    with tiermem.load(tmp_path / "fused-None", max_batch_size=2, max_seq_len=16) as m:
        logits = m.forward(ids, mask)
    with torch.no_grad():
        ref = load_tiny(hub)(input_ids=ids, attention_mask=mask,
                             position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)).logits
    assert rel_err(logits[mask.bool()], ref[mask.bool()]) <= 1e-4


def test_tiny_moe_configs_are_what_the_tests_meant():
    mixtral = model_config_from_hf(json.loads(build_model("mixtral").config.to_json_string()))
    qwen = model_config_from_hf(json.loads(build_model("qwen3-moe").config.to_json_string()))
    assert mixtral.moe.num_experts == 4 and mixtral.moe.normalize_top_k
    assert qwen.moe.sparse_layers == (True, False, True) and not qwen.moe.normalize_top_k


def test_the_cost_model_counts_the_flops_of_the_chosen_experts_only():
    from tiermem.cost_model import Workload

    cfg = model_config_from_hf(MIXTRAL_8X7B)
    sizes = {block: 1 for block in cfg.block_names}
    attention = 2 * 4096 * 4096 + 2 * 1024 * 4096
    per_token = attention + 8 * 4096 + 2 * 3 * 14336 * 4096  # q k v o, the router, 2 of the 8 experts
    assert Workload.from_config(cfg, sizes).flops_per_token_layer == 2.0 * per_token
    qwen = model_config_from_hf(dict(QWEN3_30B_A3B, mlp_only_layers=list(range(24))))  # half the layers dense
    attention = 2 * 4096 * 2048 + 2 * 512 * 2048
    dense, sparse = 3 * 6144 * 2048, 128 * 2048 + 8 * 3 * 768 * 2048
    assert Workload.from_config(qwen, sizes).flops_per_token_layer == 2.0 * (attention + (dense + sparse) / 2)


def test_the_cost_model_streams_only_the_chosen_experts_where_a_step_takes_chosen_experts():
    """Mixtral-8x7B (2 of 8 experts per token): PCIe carries the host-streamed blocks less their unchosen experts at
    batch 1 and 2 and beyond 32 rows (chosen_experts), all of them from 4 to 32 rows (all_experts) and in a split
    step; disk blocks are copied whole."""
    from tiermem.cost_model import Hardware, Workload, step_cost

    cfg = model_config_from_hf(MIXTRAL_8X7B)
    sizes = {block: 10**9 for block in cfg.block_names}
    experts, rest = 8 * 3 * 14336 * 4096, 2 * 4096 * 4096 + 2 * 1024 * 4096 + 8 * 4096 + 2 * 4096  # + norms
    share = experts / (experts + rest)
    hw = Hardware(disk_read_Bps=1e9, h2d_Bps=1e10, hbm_Bps=1e12, matmul_flops=1e15, cpu_memcpy_Bps=1e10)
    for batch, micro, unchosen in ((1, 1, 0.75), (2, 1, 0.75**2), (16, 1, 0.0), (4, 1, 0.0), (40, 1, 0.75**40),
                                   (64, 2, 0.0), (2, 2, 0.0)):
        w = Workload.from_config(cfg, sizes, batch=batch)
        assert w.expert_share == pytest.approx(share, rel=1e-9)
        cost = step_cost(w, hw, resident=0, host=8 * 10**9, disk=2 * 10**9, kv="gpu", cpu_cache_compute=False,
                         micro_batches=micro)
        assert cost["pcie"] == pytest.approx((8e9 * (1 - share * unchosen) + 2e9) / 1e10), batch
    dense = model_config_from_hf(MIXTRAL_8X7B | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    assert Workload.from_config(dense, sizes).host_stream_share(1) == 1.0


def test_the_cost_model_reads_in_hbm_one_copy_of_an_expert_per_pick_where_the_routed_gemv_runs():
    """Mixtral-8x7B resident in HBM: quantized, batch 1-3 reads the other weights and an expert per pick (2, 4, 6 of
    8: the routed GEMV); batch 4-32 every expert (all_experts); beyond 32 rows only the chosen ones
    (chosen_experts), at the dequantize-then-matmul traffic; stored dense, batch 1 reads its chosen experts."""
    from dataclasses import replace

    from tiermem.cost_model import Hardware, Workload, step_cost

    cfg = model_config_from_hf(MIXTRAL_8X7B)
    sizes = {block: 10**9 for block in cfg.block_names}
    hw = Hardware(disk_read_Bps=1e9, h2d_Bps=1e10, hbm_Bps=1e12, matmul_flops=1e15, cpu_memcpy_Bps=1e10)

    def weight_seconds(batch, quantized=True):
        w = Workload.from_config(cfg, sizes, batch=batch, quantized=quantized, dtype=torch.bfloat16)
        cost = step_cost(w, hw, resident=10 * 10**9, host=0, disk=0, kv="cpu", cpu_cache_compute=True,
                         micro_batches=1)
        return w, cost["hbm"] * 1e12 / 10**10  # the share of the resident bytes read
    w, _ = weight_seconds(1)
    share = w.expert_share
    for batch, read in ((1, 1 - share * 6 / 8), (3, 1 - share * 2 / 8), (4, 1.0), (32, 2.0)):
        assert weight_seconds(batch)[1] == pytest.approx(read), batch
    w, got = weight_seconds(40)
    assert got == pytest.approx(w.weight_traffic(40) * (1 - share * 0.75**40))
    w, got = weight_seconds(1, quantized=False)
    assert got == pytest.approx(1 - share * 0.75)
    assert replace(w, cuda_graphs=True).read_share(1) == 1.0  # a capture of dense experts runs all of them


def test_info_names_the_experts(tmp_path):
    store = tiermem.pack(build_tiny("qwen3-moe", tmp_path / "hf"), tmp_path / "store", progress=False)
    info = store_info(store)
    assert info["experts"] == "6 of width 48, 2 per token, in 2 of the 3 layers"


def test_the_chosen_experts_roofline_reads_only_the_experts_a_step_is_expected_to_choose(tmp_path):
    from types import SimpleNamespace

    from tiermem.bench import chosen_experts_roofline
    from tiermem.moe_traffic import chosen_fraction, unchosen_expert_bytes

    reader = StoreReader(tiermem.pack(build_tiny("mixtral", tmp_path / "hf"), tmp_path / "s", quant="int4",
                                      group_size=16, progress=False))
    cfg = model_config_from_hf(reader.model_config)
    assert chosen_fraction(cfg.moe, 1) == 0.5 and chosen_fraction(cfg.moe, 2) == 0.75  # 2 of 4 experts per token
    specs = {b: reader.tensor_specs(b) for b in reader.block_names}
    expert = 3 * (96 * 64 // 2 + 2 * 2 * 96 * 64 // 16)  # w1, w2, w3 of one expert: int4 codes, fp16 scale + zero
    saved = unchosen_expert_bytes(specs, reader.quant, cfg.moe, 1)
    assert saved == {"embed": 0.0, "layers.0": 2 * expert, "layers.1": 2 * expert, "head": 0.0}
    weights = SimpleNamespace(resident={"layers.0": None}, host_only=frozenset({"embed"}), disk_names=frozenset())
    model = SimpleNamespace(config=cfg, reader=reader, source=SimpleNamespace(weights=weights))
    streamed = reader.block_nbytes("layers.1") + reader.block_nbytes("head")
    info = {"streamed_bytes_per_step": streamed, "gpu_weight_bytes": reader.block_nbytes("layers.0")}
    ceilings = {"h2d_pinned_Bps": 1e9, "hbm_Bps": 1e12}
    got = chosen_experts_roofline(model, info, ceilings, {"batch": 1, "decode_step_s": 1.0})
    assert got["chosen_experts_roofline_link"] == "pcie" and got["experts_chosen_per_sparse_layer"] == 2.0
    assert got["chosen_experts_roofline_step_s"] == pytest.approx((streamed - 2 * expert) / 1e9)
    dense = model_config_from_hf(MIXTRAL_8X7B | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    assert chosen_experts_roofline(SimpleNamespace(config=dense, source=model.source), info, ceilings,
                                   {"batch": 1}) == {}


def test_the_bench_table_gives_the_chosen_experts_roofline_of_a_moe_run():
    from tiermem.bench import format_table

    run = {"batch": 1, "micro_batches": 1, "prefill_s": 0.3, "decode_step_s": 0.08, "decode_step_median_s": 0.075,
           "decode_tok_per_s": 12.5, "peak_gpu_bytes": None, "chosen_experts_roofline_step_s": 0.02,
           "chosen_experts_roofline_link": "pcie", "fraction_of_chosen_experts_roofline": 0.25,
           "experts_chosen_per_sparse_layer": 2.0}
    table = format_table({"model": "mixtral-8x7b", "quant": "int4", "machine": {"gpu": "H200"}, "ceilings": {},
                          "placement": {}, "runs": [run]})
    assert ("MoE, batch 1: its tokens choose about 2.0 experts per sparse layer; reading only those would take "
            "0.0200 s (pcie), and the step reached 0.250 of that") in table


def test_the_gpu_workspace_reservation_holds_the_sparse_mlps_fp32_sums():
    from dataclasses import replace

    from tiermem.placement import workspace_bytes

    mixtral = model_config_from_hf(MIXTRAL_8X7B)
    dense = replace(mixtral, moe=None)
    rows_tokens = 4 * 512  # a prefill of 8 rows x 512 tokens in 2 micro-batches
    extra = rows_tokens * (12 * 4096 + 12 * 8)
    assert (workspace_bytes(mixtral, 8, 512, 2, torch.bfloat16) - workspace_bytes(dense, 8, 512, 2, torch.bfloat16)
            == extra)


def test_the_gpu_workspace_of_a_decode_step_holds_every_experts_activations():
    """A decode step of quantized experts may run all_experts' two launches: every expert's gate, up and SiLU
    product over all rows, its output, that in fp32 and weighted, on top of chosen_experts' sums."""
    from dataclasses import replace

    from tiermem.placement import workspace_bytes

    mixtral = model_config_from_hf(MIXTRAL_8X7B)
    dense = replace(mixtral, moe=None)
    got = (workspace_bytes(mixtral, 32, 512, 1, torch.bfloat16, quantized=True, new_tokens=1)
           - workspace_bytes(dense, 32, 512, 1, torch.bfloat16, quantized=True, new_tokens=1))
    assert got == 32 * (12 * 4096 + 12 * 8) + 8 * 32 * (3 * 14336 * 2 + 4096 * (2 + 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_gpu_a_streamed_step_of_one_token_copies_only_its_experts_and_generates_transformers_tokens(variant,
                                                                                                  tmp_path):
    """Every block streamed from host RAM, batch 1 (2 picks of 4 or 6 experts): the steps after the first move fewer
    bytes than the streamed blocks hold (tiermem.gpu_tier copies the chosen experts on demand), and the tokens are
    transformers' (fp32)."""
    src = build_tiny(variant, tmp_path / "hf")
    store = tiermem.pack(src, tmp_path / "store", progress=False)
    ids = left_padded_batch()[0][:1]  # [1, 10], no padding
    with torch.no_grad():
        ref = load_tiny(src).generate(input_ids=ids, do_sample=False, max_new_tokens=16, eos_token_id=2,
                                      pad_token_id=0)
    with tiermem.load(store, device="cuda", dtype=torch.float32, max_batch_size=1, max_seq_len=32,
                      resident_weights=0) as m:
        weights = m.source.weights
        assert m.info()["experts_on_demand_blocks"] == m.config.moe.sparse_layers.count(True)
        whole = sum(weights.host_blocks[b].numel() for b in weights.host_blocks if b not in weights.host_only)
        copied = [weights.h2d_bytes]
        out = m.generate(ids, 16, eos_token_id=2, pad_token_id=0, on_step=lambda k: copied.append(weights.h2d_bytes))
    assert torch.equal(out.cpu(), ref)
    steps = [b - a for a, b in zip(copied[2:], copied[3:], strict=False)]  # from the second decode step on
    assert steps and max(steps) < whole, (steps, whole)


class _OnDemand(dict):
    """Weights that copy each expert in when first asked for (what tiermem.gpu_tier yields for a split block)."""

    copies_experts_on_demand = True


def _gpu_int4_layer(rows: int):
    """A sparse layer of 8 int4 experts (2 picks) on the GPU in bf16, `rows` tokens routed through it: (cfg, w, x,
    weights, experts); skips without the CuPy kernels."""
    from tiermem.kernels import cupy_ops

    if not cupy_ops.cuda_kernels_available():
        pytest.skip("needs the CuPy kernels")
    cfg, w = moe_layer(experts=8, hidden=64, inter=96)
    w = {n: quantize(v, QuantScheme(4, 32)).to("cuda") if ".experts." in n else v.to("cuda", torch.bfloat16)
         for n, v in w.items()}
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to("cuda", torch.bfloat16)
    return (cfg, w, x, *moe.route(cfg, w["p.mlp.gate.weight"], x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_gpu_routed_experts_give_the_chosen_experts_result_bit_for_bit(rows):
    """int4 experts, bf16 on the GPU, 2 picks of 8: each pick through the routed GEMV as the fused GEMV computes one
    row, summed as chosen_experts sums two picks; sparse_mlp takes this path unless the weights copy experts on
    demand, whose choice must be read on the host."""
    cfg, w, x, weights, experts = _gpu_int4_layer(rows)
    routed = moe.routed_experts(cfg, "p.", w, x, weights, experts)
    assert torch.equal(routed, moe.chosen_experts(cfg, "p.", w, x, weights, experts))
    assert moe.takes_routed_experts(cfg, "p.", w, x)
    assert not moe.takes_routed_experts(cfg, "p.", _OnDemand(w), x)
    assert not moe.takes_routed_experts(cfg, "p.", w, x.float())  # fp32: the fused GEMV takes fp16/bf16 only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [4, 16, 40])
def test_gpu_every_expert_in_two_launches_gives_the_chosen_experts_result(rows):
    """all_experts where the routed GEMV takes the weights (int4, bf16): every expert a pick of all rows, in one
    launch for gate and up and one for down, within bf16 rounding of chosen_experts (which runs each expert on its
    own rows, in other batch tiles); 40 rows: what a CUDA graph capture of that many rows runs."""
    cfg, w, x, weights, experts = _gpu_int4_layer(rows)
    every = moe.all_experts(cfg, "p.", w, x, weights, experts)
    assert every.dtype == torch.float32  # the fused path's fp32 sum
    assert rel_err(every, moe.chosen_experts(cfg, "p.", w, x, weights, experts)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_streamed_experts_copied_on_demand_are_never_routed_on_the_gpu(tmp_path, monkeypatch):
    """int4 experts in bf16 streamed from host RAM, batch 1: the steps copy only the chosen experts (chosen_experts
    reads the choice on the host), so routed_experts never runs; with experts copied whole, the decode steps take it
    and give the same tokens."""
    from tiermem.kernels import cupy_ops

    if not cupy_ops.cuda_kernels_available():
        pytest.skip("needs the CuPy kernels")
    routed = []
    run = moe.routed_experts

    def recorded(*args):
        routed.append(args[3].shape[0])
        return run(*args)

    monkeypatch.setattr(moe, "routed_experts", recorded)
    store = tiermem.pack(build_tiny("mixtral-8experts", tmp_path / "hf"), tmp_path / "int4", quant="int4",
                         group_size=32, progress=False)
    ids = left_padded_batch()[0][:1]
    tokens = {}
    for on_demand in (True, False):
        with tiermem.load(store, device="cuda", dtype=torch.bfloat16, max_batch_size=1, max_seq_len=32,
                          resident_weights=0) as m:
            weights = m.source.weights
            weights.experts_on_demand = on_demand
            whole = sum(weights.host_blocks[b].numel() for b in weights.host_blocks if b not in weights.host_only)
            copied = [weights.h2d_bytes]
            tokens[on_demand] = m.generate(ids, 8, eos_token_id=[],
                                           on_step=lambda k, c=copied, w=weights: c.append(w.h2d_bytes)).cpu()
        steps = [b - a for a, b in zip(copied[2:], copied[3:], strict=False)]
        if on_demand:
            assert not routed and max(steps) < whole, (routed, steps, whole)
        else:
            assert routed.count(1) >= 6 * 2 and min(steps) >= whole  # 2 sparse layers a step, every expert copied
    assert torch.equal(tokens[True], tokens[False])


def test_cli_plan_says_which_experts_a_decode_step_copies(tmp_path, capsys, monkeypatch):
    """Mixtral-8x22B in 24 GiB of GPU memory: batch 1 copies its chosen experts (28% of a sparse layer's bytes with
    2 of 8 chosen: the shared part and 1 - 0.75 of the experts), batch 8 every expert; a dense model says nothing.
    Mixtral-8x7B all in HBM: batch 1 reads one expert per pick there, batch 16 every expert."""
    from tiermem.cli import main
    from tiermem.cost_model import Hardware, Workload

    monkeypatch.setenv("HOME", str(tmp_path))
    hw = tmp_path / "hw.json"
    hw.write_text(Hardware(disk_read_Bps=1.7e9, h2d_Bps=5.3e10, hbm_Bps=4.2e12, matmul_flops=7.5e14,
                           cpu_memcpy_Bps=3e10, name="H200").to_json())
    common = ["--quant", "int4", "--group-size", "128", "--gpu-memory", "24GiB", "--cpu-memory", "100GiB",
              "--hardware", str(hw)]
    assert main(["plan", "--synthetic", "mixtral-8x22b", "--batch", "1", *common]) == 0
    assert "copies only the experts its tokens choose of the sparse layers in pinned host memory: 28%" in \
        capsys.readouterr().out
    assert main(["plan", "--synthetic", "mixtral-8x22b", "--batch", "8", *common]) == 0
    assert "copies every expert (its picks cover them, or the step is split)" in capsys.readouterr().out
    assert main(["plan", "--synthetic", "llama-13b", "--batch", "1", *common]) == 0
    assert "experts" not in capsys.readouterr().out
    resident = ["--quant", "int4", "--group-size", "128", "--gpu-memory", "140GiB", "--cpu-memory", "100GiB",
                "--hardware", str(hw)]
    assert main(["plan", "--synthetic", "mixtral-8x7b", "--batch", "1", *resident]) == 0
    out = capsys.readouterr().out
    assert "experts:" not in out  # nothing streamed from host RAM
    cfg = model_config_from_hf(MIXTRAL_8X7B)
    share = Workload.from_config(cfg, {block: 1 for block in cfg.block_names}).expert_share
    assert (f"a decode step reads one expert per pick (2 of 8, the routed GEMV) of the sparse layers there: "
            f"{1 - share * 0.75:.0%}") in out
    assert main(["plan", "--synthetic", "mixtral-8x7b", "--batch", "16", *resident]) == 0
    assert "reads every expert of the sparse layers there: 100%" in capsys.readouterr().out

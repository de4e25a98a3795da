"""Pure placement decisions: KV and workspace reservations, the host tier of the GPU path."""

import pytest
import torch

from tiermem.engine.config import model_config_from_hf
from tiermem.errors import BudgetError
from tiermem.gpu_tier import plan_gpu_residency
from tiermem.placement import kv_cache_bytes, plan_host_tier, workspace_bytes
from tiermem.presets import preset

ORDER = ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"]
SIZES = {"embed": 40, "layers.0": 100, "layers.1": 100, "layers.2": 100, "layers.3": 100, "head": 60}


def test_kv_and_workspace_bytes():
    cfg = model_config_from_hf(preset("llama-13b"))
    # 40 layers x K and V x 40 heads x 128 dims x 2 bytes = 800 KiB per token
    assert kv_cache_bytes(cfg, 1, 1, torch.float16) == 40 * 2 * 40 * 128 * 2
    assert kv_cache_bytes(cfg, 8, 512, torch.float16) == 8 * 512 * kv_cache_bytes(cfg, 1, 1, torch.float16)
    assert workspace_bytes(cfg, 8, 512, 4, torch.float16) < workspace_bytes(cfg, 8, 512, 1, torch.float16)


def test_gpu_residency_takes_blocks_in_order_and_leaves_room_for_the_ring():
    resident, used = plan_gpu_residency(SIZES, ORDER, ("embed",), budget=560, lookahead=2)
    assert resident == ["layers.0", "layers.1"] and used == 200 + 3 * 100
    assert plan_gpu_residency(SIZES, ORDER, ("embed",), budget=10_000, lookahead=2) == (ORDER[1:], 460)
    assert plan_gpu_residency(SIZES, ORDER, ("embed",), budget=10_000, lookahead=2, max_resident=0)[0] == []
    with pytest.raises(BudgetError, match="gpu_memory"):
        plan_gpu_residency(SIZES, ORDER, ("embed",), budget=299, lookahead=2)


def test_host_tier_keeps_embedding_then_fills_ram_and_sends_the_rest_to_disk():
    host, disk, staging = plan_host_tier(SIZES, ORDER, ["layers.0"], cpu_memory=None, lookahead=2)
    assert host == ["embed", "layers.1", "layers.2", "layers.3", "head"] and disk == [] and staging == 0
    host, disk, staging = plan_host_tier(SIZES, ORDER, ["layers.0"], cpu_memory=40 + 300, lookahead=1)
    assert (host, disk, staging) == (["embed", "layers.1"], ["layers.2", "layers.3", "head"], 200)
    with pytest.raises(BudgetError, match="embedding"):
        plan_host_tier(SIZES, ORDER, [], cpu_memory=39, lookahead=2)
    with pytest.raises(BudgetError, match="cpu_memory"):
        plan_host_tier(SIZES, ORDER, [], cpu_memory=40 + 250, lookahead=2)


def test_follow_plan_checks_the_store_and_the_budgets():
    from tiermem.errors import ConfigError
    from tiermem.placement import follow_plan
    from tiermem.planner import Plan

    chosen = Plan(("layers.0",), ("layers.1", "head"), ("layers.2", "layers.3"), lookahead=1)
    assert Plan.from_dict(vars(chosen)) == chosen
    resident, host, disk, weight_bytes, staging = follow_plan(chosen, SIZES, ORDER, weights_budget=300,
                                                              cpu_memory=40 + 160 + 200)
    assert (resident, host, disk) == (["layers.0"], ["embed", "layers.1", "head"], ["layers.2", "layers.3"])
    assert weight_bytes == 100 + 2 * 100 and staging == 2 * 100
    with pytest.raises(BudgetError, match="GPU memory"):
        follow_plan(chosen, SIZES, ORDER, weights_budget=299, cpu_memory=None)
    with pytest.raises(BudgetError, match="pinned host"):
        follow_plan(chosen, SIZES, ORDER, weights_budget=300, cpu_memory=399)
    with pytest.raises(ConfigError, match="store has blocks"):
        follow_plan(Plan(("layers.0",), (), ()), SIZES, ORDER, weights_budget=10**6, cpu_memory=None)
    assert follow_plan(Plan(ORDER[1:], (), (), kv="cpu"), SIZES, ORDER, weights_budget=10**6, cpu_memory=None)[0]
    assert follow_plan(Plan(ORDER[1:], (), (), kv="cpu", cpu_cache_compute=True), SIZES, ORDER,
                       weights_budget=10**6, cpu_memory=None)[0]
    with pytest.raises(ConfigError, match="unknown fields"):
        Plan.from_dict({"gpu_blocks": [], "colour": "red"})

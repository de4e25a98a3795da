"""Peer anchor for mixtures of experts: HF transformers + accelerate `device_map="auto"` with a GPU memory cap (CPU
offload), on a random-weight Mixtral-8x7B-shaped checkpoint of LAYERS of its 32 layers (the GPU machine's disk
holds no 93 GB bf16 Mixtral); the same method as ../shared/peers/peer_accelerate.py, whose JSON keys it writes.

    LAYERS=4 GPU_CAP=8 BATCHES=1,8 NEW_TOKENS=8 CKPT=/root/ckpt-mixtral OUT=dir python3 peer_accelerate_moe.py

The checkpoint is written with save_pretrained (bf16) if CKPT has none, so that `tiermem pack` can read it too.
Timing: greedy generate of NEW_TOKENS after a 32-token prompt (prefill included), after a 2-token warm-up; the
roofline is the offloaded bytes over 55 GB/s (pinned PCIe on the H200 machine).
"""

import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

layers = int(os.environ.get("LAYERS", "4"))
cap = float(os.environ.get("GPU_CAP", "8"))
ckpt = os.environ.get("CKPT", f"/root/ckpt-mixtral-{layers}l")
batches = [int(b) for b in os.environ.get("BATCHES", "1,8").split(",")]
new_tokens = int(os.environ.get("NEW_TOKENS", "8"))
name = f"mixtral8x7b_{layers}l"
result = {"cfg": name, "gpu_cap_GiB": cap, "transformers": __import__("transformers").__version__}

config = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, torch_dtype="bfloat16")
if not os.path.exists(os.path.join(ckpt, "config.json")):
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MixtralForCausalLM(config).to(torch.bfloat16)
    model = model.cpu()
    model.save_pretrained(ckpt, safe_serialization=True, max_shard_size="4GB")
    del model
    result["write_s"] = time.perf_counter() - t0
nbytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
result["ckpt_GB"] = nbytes / 1e9
torch.cuda.empty_cache()

t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map="auto",
                                             max_memory={0: f"{cap}GiB", "cpu": "100GiB"})
result["load_s"] = time.perf_counter() - t0
device_map = getattr(model, "hf_device_map", {})
result["device_map_counts"] = {str(v): sum(1 for x in device_map.values() if x == v) for v in set(device_map.values())}
gpu_bytes = torch.cuda.memory_allocated()
result["gpu_resident_GB"] = gpu_bytes / 1e9
offloaded = nbytes - gpu_bytes
result["offloaded_GB"] = offloaded / 1e9

for batch in batches:
    ids = torch.randint(0, 32000, (batch, 32), device="cuda")
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result[f"b{batch}_s_per_step"] = seconds / new_tokens  # one of the steps is the prefill
    result[f"b{batch}_tok_per_s"] = batch * new_tokens / seconds
    result[f"b{batch}_roofline_s_per_step_at_55GBps"] = offloaded / 55e9
    result[f"b{batch}_fraction_of_pcie_roofline"] = (offloaded / 55e9) / (seconds / new_tokens)

print(json.dumps(result, indent=1))
with open(os.path.join(os.environ.get("OUT", "."), f"peer_accelerate_{name}.json"), "w") as f:
    json.dump(result, f, indent=1)

"""Where a resident decode step waits: host issue, torch syncs, GPU gaps (llama3-8b int4, batch 16 x 2048).

    OUT=DIR python3 benchmarks/host_gap.py [none|int4]   (the KV cache: bf16, or int4)

Synthetic llama3-8b int4, all resident, batch 16 x 2048. Writes $OUT/host_gap_<kv>.json with: decode steps timed
with and without a sync per step (host stamps and CUDA events); the torch-level synchronizing calls inside two steps
(sync debug mode, with their stacks); a profiler trace of three steps reduced to kernel time, GPU gaps, launch-to-
start delays and the longest CUDA runtime calls; and the narrow-model host probe (tiermem.host_probe) at prompt 16
and 2048.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import time
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from tiermem import host_probe
from tiermem.api import load_from_reader
from tiermem.kernels.quant import QuantScheme
from tiermem.presets import preset
from tiermem.synthetic import SyntheticStore

B, T, STEPS = 16, 2048, 10


def timed_generation(model, ids, sync: bool, steps: int = STEPS, callback=None) -> tuple[list[float], list[float]]:
    """(host seconds, CUDA-event seconds) between consecutive steps after the first; sync: a device sync per step."""
    stamps, events = [], []

    def on_step(k: int) -> None:
        if sync:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append(event)
        if callback:
            callback(k)

    model.generate(ids, steps, eos_token_id=[], on_step=on_step)
    torch.cuda.synchronize()
    host = [b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True)]
    gpu = [a.elapsed_time(b) / 1e3 for a, b in zip(events[1:-1], events[2:], strict=True)]
    return host, gpu


def torch_syncs(model, ids) -> list[dict]:
    """The stacks of the synchronizing torch calls in decode steps 3 and 4, most frequent first."""
    seen: collections.Counter = collections.Counter()

    def record(*_args, **_kwargs) -> None:
        seen["".join(traceback.format_stack(limit=12)[:-1])[-1500:]] += 1

    shown = warnings.showwarning

    def callback(k: int) -> None:
        if k == 3:
            torch.cuda.set_sync_debug_mode(1)
            warnings.showwarning = record
        if k == 5:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = shown

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        timed_generation(model, ids, False, 6, callback)
    return [{"count": c, "stack": s} for s, c in seen.most_common(8)]


def trace_summary(model, ids) -> dict:
    """Decode steps 4-6 under the profiler: kernels, GPU gaps, launch-to-start delays, CUDA runtime calls."""
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def callback(k: int) -> None:
        if k == 3:
            prof.start()
        if k == 6:
            prof.stop()

    timed_generation(model, ids, True, 7, callback)
    path = "/tmp/host_gap_trace.json"
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)["traceEvents"]
    launch, kernels, longest = {}, [], []
    runtime: dict = collections.defaultdict(lambda: [0, 0.0])
    for e in trace:
        cat, corr = e.get("cat", ""), (e.get("args") or {}).get("correlation")
        if cat in ("cuda_runtime", "cuda_driver"):
            runtime[e["name"]][0] += 1
            runtime[e["name"]][1] += e.get("dur", 0)
            longest.append((e.get("dur", 0), e["name"]))
            if corr is not None:
                launch[corr] = e["ts"]
        elif cat == "kernel":
            kernels.append((e["ts"], e.get("dur", 0), corr, e["name"][:60]))
    kernels.sort()
    delays = [k[0] - launch[k[2]] for k in kernels if k[2] in launch]
    gaps = [b[0] - (a[0] + a[1]) for a, b in zip(kernels, kernels[1:], strict=False)]
    return {
        "kernels": len(kernels), "kernel_us_total": sum(k[1] for k in kernels),
        "span_us": kernels[-1][0] + kernels[-1][1] - kernels[0][0],
        "queue_delay_us_quantiles": statistics.quantiles(delays, n=10) if delays else None,
        "gpu_gap_us_total": sum(g for g in gaps if g > 0),
        "gpu_gaps_over_100us": sorted([(round(g), kernels[i + 1][3]) for i, g in enumerate(gaps) if g > 100],
                                      reverse=True)[:15],
        "runtime_calls": sorted(([n, c, round(d)] for n, (c, d) in runtime.items()), key=lambda r: -r[2])[:15],
        "longest_runtime_calls": sorted(longest, reverse=True)[:15],
    }


def main() -> None:
    out = os.environ["OUT"]
    kv_quant = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "none" else None
    hf, quant = preset("llama3-8b"), QuantScheme.from_name("int4", 128)
    result = {}
    with load_from_reader(SyntheticStore(hf, quant, torch.bfloat16, "cuda"), "cuda", None, None,
                          dtype=torch.bfloat16, max_batch_size=B, max_seq_len=T + 3 * STEPS + 10, kv_quant=kv_quant,
                          plan=None) as model:
        ids = torch.randint(3, hf["vocab_size"], (B, T))
        timed_generation(model, ids, True, 4)
        result["sync_step_s"], result["sync_gpu_event_s"] = timed_generation(model, ids, True)
        result["nosync_host_s"], result["nosync_gpu_event_s"] = timed_generation(model, ids, False)
        result["torch_syncs_in_2_steps"] = torch_syncs(model, ids)
        stats = torch.cuda.memory_stats()
        result["cuda_mallocs"], result["cuda_frees"] = stats.get("num_device_alloc"), stats.get("num_device_free")
        result["trace"] = trace_summary(model, ids)
    for prompt_len in (16, 2048):
        host_probe.PROMPT_LEN = prompt_len
        result[f"narrow_probe_prompt{prompt_len}_s"] = [
            host_probe._step_seconds(host_probe.narrow_config(hf, 32, 128), quant, torch.bfloat16, kv_quant, None,
                                     B, "cuda") for _ in range(2)]
    print(json.dumps({k: v for k, v in result.items() if k != "torch_syncs_in_2_steps"}, indent=1))
    for sync in result["torch_syncs_in_2_steps"]:
        print("SYNC x", sync["count"], sync["stack"][-700:])
    with open(f"{out}/host_gap_{kv_quant or 'bf16'}.json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

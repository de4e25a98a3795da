"""Split the disk KV tier's step into a read rate and a fixed cost per layer, from recorded runs.

A bf16 and an int4 disk-KV run of one device call (llama3-8b int4 weights resident, batch 16 x 2048,
benchmarks/device_kv_tiers.sh) read different bytes per layer through the same code. Fitting
step / layers = bytes per layer / R + g to the pair gives the rate R the reads ran at and g, the time
per layer that does not scale with the bytes (per-call costs, queue drain, what the I/O thread does
besides reading). Reads recorded files only; no device needed.

    python3 benchmarks/disk_kv_fixed_cost.py --out benchmarks/results/disk_kv_fixed_cost.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LAYERS = 32  # llama3-8b
# device call -> (bf16 run, int4 run), each file benchmarks/results/llama3_8b_int4_b16x2048_kv_<run>_h200.json
PAIRS = {
    "session 5, call 11": ("disk_call11", "disk_int4_call11"),
    "session 6, call 1": ("disk_s6call1", "disk_int4_s6call1"),
    "session 7, call 1": ("disk_s7call1", "disk_int4_s7call1"),
}


def per_layer(run: str) -> tuple[float, float, float]:
    """(seconds, disk bytes, POSIX reader's rate after the run) per layer of a recorded decode step."""
    result = json.loads((RESULTS / f"llama3_8b_int4_b16x2048_kv_{run}_h200.json").read_text())
    (timed,) = result["runs"]
    posix = result["ceilings"].get("disk_read_posix_direct_Bps", float("nan"))
    return timed["decode_step_s"] / LAYERS, timed["kv_disk_bytes_per_step"] / LAYERS, posix


def fit(dense: str, quantized: str) -> dict:
    (t_d, b_d, posix_d), (t_q, b_q, posix_q) = per_layer(dense), per_layer(quantized)
    rate = (b_d - b_q) / (t_d - t_q)
    return {"runs": [dense, quantized], "layer_seconds": [t_d, t_q], "layer_disk_bytes": [b_d, b_q],
            "read_rate_Bps": rate, "fixed_seconds_per_layer": t_d - b_d / rate,
            "posix_probe_after_run_Bps": [posix_d, posix_q],
            "fixed_share_of_step": [(t_d - b_d / rate) / t_d, (t_d - b_d / rate) / t_q]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the fits as JSON here")
    args = p.parse_args()
    fits = {call: fit(*runs) for call, runs in PAIRS.items()}
    for call, f in fits.items():
        print(f"{call}: R {f['read_rate_Bps'] / 1e9:.2f} GB/s, g {f['fixed_seconds_per_layer'] * 1e3:.1f} ms per "
              f"layer ({f['fixed_share_of_step'][0]:.1%} of the bf16 step, {f['fixed_share_of_step'][1]:.1%} "
              "of the int4 one)")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": "python3 benchmarks/disk_kv_fixed_cost.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "machine": "none (reads recorded H200 runs)", "model": "step / layers = bytes / R + g", "fits": fits},
            indent=1))


if __name__ == "__main__":
    main()

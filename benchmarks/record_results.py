"""Merge a `tiermem bench` JSON with a peer's output from the same device call into benchmarks/results/.

    python3 benchmarks/record_results.py --tiermem T.json --flexgen b1=LOG [b128=LOG ...] \
        --peer-command "..." --out benchmarks/results/NAME.json
    python3 benchmarks/record_results.py --tiermem T.json --accelerate A.json --out ...

FlexGen's figures are parsed from its own log ("decode throughput: X token/s"); Accelerate's come from
the JSON its peer script writes. Ratios are tiermem tok/s over the peer's tok/s for the same batch.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FLEXGEN_FIELDS = {
    "prefill_latency_s": r"prefill latency: ([\d.]+) s",
    "decode_latency_s": r"decode latency: ([\d.]+) s",
    "decode_tok_per_s": r"decode throughput: ([\d.]+) token/s",
    "total_tok_per_s": r"total throughput: ([\d.]+) token/s",
    "model_size_GiB": r"model size: ([\d.]+) GB",
    "peak_gpu_GiB": r"peak gpu mem: ([\d.]+) GB",
}


def parse_flexgen(log: str) -> dict:
    """FlexGen's summary lines -> numbers (its GB are GiB: it divides by 2**30)."""
    out = {}
    for key, pattern in FLEXGEN_FIELDS.items():
        match = re.findall(pattern, log)
        if not match:
            raise SystemExit(f"FlexGen log has no '{pattern}' line: the run failed? ({log[-300:]!r})")
        out[key] = float(match[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiermem", required=True)
    p.add_argument("--flexgen", nargs="*", default=[], help="BATCH=LOG pairs")
    p.add_argument("--accelerate", default=None, help="peer_accelerate JSON")
    p.add_argument("--peer-command", action="append", default=[])
    p.add_argument("--device-call", required=True, help="which device call produced these files")
    p.add_argument("--plot", default=None, help="PNG drawn by the same tiermem run")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ours = json.loads(Path(args.tiermem).read_text())
    peers: dict[int, dict] = {}
    for item in args.flexgen:
        batch, log = item.split("=", 1)
        peers[int(batch)] = {"system": "FlexGen 0.1.8", **parse_flexgen(Path(log).read_text())}
    if args.accelerate:
        acc = json.loads(Path(args.accelerate).read_text())
        for key, value in acc.items():
            match = re.fullmatch(r"b(\d+)_tok_per_s", key)
            if match:
                b = int(match.group(1))
                peers[b] = {"system": "HF transformers + accelerate", "tok_per_s": value,
                            "s_per_step": acc[f"b{b}_s_per_step"],
                            "fraction_of_pcie_roofline_by_its_script": acc[f"b{b}_fraction_of_pcie_roofline"]}
        peers_meta = {k: v for k, v in acc.items() if not re.match(r"b\d+_", k)}
    else:
        peers_meta = {}
    comparisons = []
    for run in ours["runs"]:
        peer = peers.get(run["batch"])
        if peer is None:
            continue
        if "decode_tok_per_s" in peer:  # FlexGen reports decode-only throughput, as tiermem's decode figure
            ratio = run["decode_tok_per_s"] / peer["decode_tok_per_s"]
            basis = "decode tok/s (prefill excluded), both"
        else:  # the Accelerate script times prefill + decode together
            ratio = run["tok_per_s_incl_prefill"] / peer["tok_per_s"]
            basis = "tok/s including prefill, both"
        comparisons.append({"batch": run["batch"], "tiermem": run, "peer": peer, "ratio": ratio, "basis": basis})
    result = {
        "device_call": args.device_call,
        "tiermem_command": ours["command"],
        "peer_commands": args.peer_command,
        "machine": ours["machine"],
        "ceilings": ours["ceilings"],
        "model": ours["model"], "quant": ours["quant"], "placement": ours["placement"],
        "peer_run": peers_meta,
        "comparisons": comparisons,
        "tiermem_runs_without_peer": [r for r in ours["runs"] if r["batch"] not in peers],
        "plot": args.plot,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    for c in comparisons:
        print(f"batch {c['batch']}: ratio {c['ratio']:.3f} ({c['basis']}), tiermem at "
              f"{c['tiermem'].get('fraction_of_roofline', float('nan')):.3f} of roofline")


if __name__ == "__main__":
    main()

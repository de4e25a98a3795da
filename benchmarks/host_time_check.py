"""How well the narrow-model host probe (tiermem.host_probe) predicts the decode step of a resident model.

    python3 benchmarks/host_time_check.py --synthetic llama3-8b --quant int4 --kv-quant int4 --rows 1,16,64 \
        --prompt-len 1024 --repeats 3 --out DIR

For each row count, alternately (repeats times): the probe's HostTime (measured afresh, not the cached figure)
after a prompt of each of --probe-contexts tokens (the library's probe takes 16), and the median decode step of
the full model, all resident, in the same process. Writes DIR/host_time_check.json
with every figure, so that the probe's error and the run-to-run spread of both can be read side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from synthetic_model import add_model_arguments, command, quant_scheme, synthetic_store

from tiermem.api import load_from_reader
from tiermem.host_probe import _measure, measure_host_time
from tiermem.presets import preset

STEPS = 12


def decode_step_s(model, rows: int, prompt_len: int) -> float:
    """Median decode step (s) of `rows` sequences after a prompt of prompt_len tokens."""
    stamps: list[float] = []

    def on_step(k: int) -> None:
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    ids = torch.randint(3, model.config.vocab_size, (rows, prompt_len))
    model.generate(ids, STEPS + 1, eos_token_id=[], on_step=on_step)
    return statistics.median(b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p, prompt_len=1024, batch=None)
    p.add_argument("--rows", default="1,16,64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--probe-contexts", default="16", help="prompt lengths the narrow-model probe runs after")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    config, dtype = preset(args.synthetic), torch.bfloat16
    rows = [int(r) for r in args.rows.split(",")]
    contexts = [int(c) for c in args.probe_contexts.split(",")]
    model = load_from_reader(synthetic_store(args, "cuda"), "cuda", None, None, dtype=dtype, max_batch_size=max(rows),
                             max_seq_len=args.prompt_len + STEPS + 1, kv_quant=args.kv_quant, plan=None)
    decode_step_s(model, 1, 8)  # warm-up
    out = []
    for r in rows:
        for rep in range(args.repeats):
            _measure.cache_clear()  # measured afresh, not remembered from the last repeat
            predicted = {c: measure_host_time(config, quant_scheme(args), dtype, args.kv_quant, None, r,
                                              prompt_len=c).step_s(1) for c in contexts}
            measured = decode_step_s(model, r, args.prompt_len)
            out.append({"rows": r, "repeat": rep, "probe_layers": model.config.num_layers,
                        "predicted_host_step_s_by_probe_context": predicted, "measured_step_s": measured})
            probes = "  ".join(f"probe@{c} {s * 1e3:7.2f} ms" for c, s in predicted.items())
            print(f"rows {r:3d}  {probes}  measured {measured * 1e3:7.2f} ms", flush=True)
    model.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_time_check.json").write_text(json.dumps({
        "command": command(), "gpu": torch.cuda.get_device_name(), "runs": out}, indent=1))


if __name__ == "__main__":
    main()

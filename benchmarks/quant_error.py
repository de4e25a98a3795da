"""Logits error of int8 / int4 stores against the unquantized store, per model family (CPU, fp32).

    python3 benchmarks/quant_error.py --out benchmarks/results/quant_logits_error.json
Random-weight models of small Llama- and OPT-like shapes are written as HF checkpoints,
packed dense / int8 / int4, and run on the same prompts; the error is
max |logits_q - logits| / max |logits| and the norm-wise ‖logits_q - logits‖ / ‖logits‖, plus the
fraction of positions whose greedy (argmax) token agrees. Random N(0, 0.02) weights give nearly flat
logits, so these relative errors are far larger than on trained checkpoints; they compare schemes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

import tiermem
from tiermem.presets import preset
from tiermem.synthetic import write_hf_checkpoint

SHAPES = {
    "llama": dict(preset("tiny-llama"), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2),
    "opt": dict(preset("opt-1.3b"), hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=8,
                vocab_size=512, max_position_embeddings=512, torch_dtype="float32"),
}


def measure(family: str, config: dict, root: Path, group_size: int) -> dict:
    src = write_hf_checkpoint(config, root / f"{family}-hf", seed=0)
    ids = torch.randint(3, config["vocab_size"], (4, 48), generator=torch.Generator().manual_seed(0))
    logits = {}
    for quant in (None, "int8", "int4"):
        store = tiermem.pack(src, root / f"{family}-{quant}", quant=quant, group_size=group_size, progress=False)
        with tiermem.load(store, max_batch_size=4, max_seq_len=48) as model:
            logits[quant] = model.forward(ids)
    ref = logits[None]
    out = {}
    for quant in ("int8", "int4"):
        diff = logits[quant] - ref
        out[quant] = {
            "max_rel_error": float(diff.abs().max() / ref.abs().max()),
            "norm_rel_error": float(diff.norm() / ref.norm()),
            "argmax_agreement": float((logits[quant].argmax(-1) == ref.argmax(-1)).float().mean()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {family: measure(family, config, Path(tmp), args.group_size) for family, config in SHAPES.items()}
    report = {"command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv), "group_size": args.group_size,
              "torch": torch.__version__, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))
    for family, by_quant in results.items():
        for quant, r in by_quant.items():
            print(f"{family:6} {quant}: max rel {r['max_rel_error']:.4f}  norm rel {r['norm_rel_error']:.4f}  "
                  f"argmax agreement {r['argmax_agreement']:.3f}")


if __name__ == "__main__":
    main()

"""Logits error of an int8 / int4 KV cache against the dense KV cache, per tiny model family (CPU, fp32).

    python3 benchmarks/kv_quant_error.py --out benchmarks/results/kv_quant_error.json

The tiny random-weight HF models of tests/hf_models.py are packed (unquantized weights) and loaded
with kv_quant=None / "int8" / "int4" (groups of head_dim, plus int4 with groups of 8). The dense model
greedily continues each prompt; every cache then runs that sequence teacher-forced (prefill of the
prompt, then one token a step through the cache), so all caches see the same tokens. Reported over
real positions: max |logits_q - logits| / max |logits|, ‖logits_q - logits‖ / ‖logits‖, the fraction of
positions whose argmax agrees, and the agreement of free-running greedy outputs (which diverge for good
after the first flipped near tie). Random weights give nearly flat logits: the errors compare schemes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tiermem  # noqa: E402
from tiermem.engine.kv_cache import KVCache  # noqa: E402

SCHEMES = (("int8", None), ("int4", None), ("int4", 8))



def measure(variant: str, root: Path, batch: int, prompt: int, new: int) -> dict:
    from hf_models import build_tiny, cached_logits

    store = tiermem.pack(build_tiny(variant, root / variant / "hf"), root / variant / "store", progress=False)
    ids = torch.randint(3, 256, (batch, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # left padding of varying width
        ids[row, :row * 2] = 0
        mask[row, :row * 2] = 0
    kw = dict(max_batch_size=batch, max_seq_len=prompt + new)
    with tiermem.load(store, **kw) as m:
        dense = m.generate(ids, new, attention_mask=mask, eos_token_id=[])
        full_mask = torch.cat([mask, torch.ones(batch, new, dtype=mask.dtype)], dim=1)
        ref = cached_logits(m, dense, full_mask, prompt, None)
        dense_bytes = KVCache.allocate(m.config, batch, prompt + new, m.dtype).nbytes
        head_dim = m.config.head_dim
    real = full_mask.bool()
    out = {"head_dim": head_dim}
    for name, group in SCHEMES:
        with tiermem.load(store, kv_quant=name, kv_group_size=group, **kw) as m:
            logits = cached_logits(m, dense, full_mask, prompt, m.kv_quant)
            greedy = m.generate(ids, new, attention_mask=mask, eos_token_id=[])
            qbytes = KVCache.allocate(m.config, batch, prompt + new, m.dtype, kv_quant=m.kv_quant).nbytes
            label = f"{name}-g{m.kv_quant.group_size}"
        diff = logits[real] - ref[real]
        out[label] = {
            "max_rel_error": float(diff.abs().max() / ref[real].abs().max()),
            "norm_rel_error": float(diff.norm() / ref[real].norm()),
            "argmax_agreement": float((logits[real].argmax(-1) == ref[real].argmax(-1)).float().mean()),
            "greedy_agreement": float((greedy[:, prompt:] == dense[:, prompt:]).float().mean()),
            "nbytes_ratio_vs_fp32": qbytes / dense_bytes,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="llama3,opt,llama2,mistral,qwen2")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {v: measure(v, Path(tmp), args.batch, args.prompt, args.new) for v in args.variants.split(",")}
    report = {"command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv), "torch": torch.__version__,
              "dtype": "float32", "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new,
              "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for variant, by_scheme in results.items():
        for label, r in by_scheme.items():
            if label == "head_dim":
                continue
            print(f"{variant:8} {label:8}: max rel {r['max_rel_error']:.4f}  norm rel {r['norm_rel_error']:.4f}  "
                  f"argmax {r['argmax_agreement']:.3f}  greedy {r['greedy_agreement']:.3f}  "
                  f"bytes x{r['nbytes_ratio_vs_fp32']:.3f}")


if __name__ == "__main__":
    main()

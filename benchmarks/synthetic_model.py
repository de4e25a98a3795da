"""What the resident-model benchmarks share: the options naming a random-weight model and the command line as run.

    p = argparse.ArgumentParser(); add_model_arguments(p, prompt_len=2048)
    store = synthetic_store(args, "cuda")   # tiermem.synthetic: random weights, generated where they live
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from tiermem.kernels.quant import QuantScheme
from tiermem.presets import preset
from tiermem.synthetic import SyntheticStore

GROUP_SIZE = 128  # the weights' quantization group, as the 111B and llama3-8b benchmarks use


def add_model_arguments(p: argparse.ArgumentParser, prompt_len: int, batch: int | None = 16) -> None:
    """--synthetic, --quant, --kv-quant, --prompt-len and (unless batch is None) --batch."""
    p.add_argument("--synthetic", default="llama3-8b", help="a named shape (tiermem/presets.py)")
    p.add_argument("--quant", default="int4", help="weights: int4, int8 or none")
    p.add_argument("--kv-quant", default=None, help="the KV cache: int8, int4 or dense (default)")
    p.add_argument("--prompt-len", type=int, default=prompt_len)
    if batch is not None:
        p.add_argument("--batch", type=int, default=batch)


def quant_scheme(args: argparse.Namespace) -> QuantScheme | None:
    return QuantScheme.from_name(None if args.quant == "none" else args.quant, GROUP_SIZE)


def synthetic_store(args: argparse.Namespace, device: str) -> SyntheticStore:
    """The random-weight model of --synthetic / --quant in bf16, its blocks generated on `device`."""
    return SyntheticStore(preset(args.synthetic), quant_scheme(args), torch.bfloat16, device)


def command() -> str:
    """This process's command line, as recorded with its results."""
    return "python3 " + " ".join(shlex.quote(a) for a in sys.argv)

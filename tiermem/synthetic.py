"""Random-weight models: HF checkpoints for the demo and tests, blocks for synthetic benchmarks.

Initialisation follows HF's: linear weights and embeddings ~ N(0, 0.02), norm weights 1, biases 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tiermem.engine.config import expected_weights, model_config_from_hf


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """One weight initialised the way HF initialises a fresh model."""
    leaf = name.rsplit(".", 2)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) == 1 and "norm" in leaf[-2]:
        return torch.ones(shape, dtype=dtype, device=device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    out.normal_(0.0, 0.02, generator=generator)
    return out.to(dtype)


def random_block(hf_config: dict, block: str, seed: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The random tensors of one block ("embed", "layers.i", "head"), reproducible from (seed, block)."""
    specs = expected_weights(model_config_from_hf(hf_config))[block]
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + sum(map(ord, block)) * 7919 + _block_index(block))
    return {name: random_tensor(name, shape, generator, dtype, device) for name, shape in specs.items()}


def _block_index(block: str) -> int:
    return int(block.split(".")[1]) if block.startswith("layers.") else 0


def write_hf_checkpoint(hf_config: dict, dst: str | Path, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json + model.safetensors with random weights (small models only: built in RAM)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    blocks = expected_weights(model_config_from_hf(hf_config))
    tensors: dict[str, torch.Tensor] = {}
    for block in blocks:
        tensors.update(random_block(hf_config, block, seed, dtype))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2))
    return dst

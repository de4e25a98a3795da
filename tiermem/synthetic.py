"""Random-weight models: HF checkpoints for the demo and tests, blocks for synthetic benchmarks.

Initialisation follows HF's: linear weights and embeddings ~ N(0, 0.02), norm weights 1, biases 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from tiermem.engine.config import expected_weights, model_config_from_hf, tied_head_alias
from tiermem.kernels.quant import QuantScheme, quantize
from tiermem.storage.durable import atomic_directory
from tiermem.storage.format import StoreWriter, TensorSpec, decode_entry, encode_block, planned_block_nbytes
from tiermem.storage.pack import default_should_quantize


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  norm_plus_one: bool = False) -> torch.Tensor:
    """One weight initialised the way HF initialises a fresh model (norm_plus_one: a Gemma model, whose norms apply
    1 + w and start at w = 0)."""
    leaf = name.rsplit(".", 2)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) == 1 and "norm" in leaf[-2]:
        return (torch.zeros if norm_plus_one else torch.ones)(shape, dtype=dtype, device=device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    out.normal_(0.0, 0.02, generator=generator)
    return out.to(dtype)


def random_block(hf_config: dict, block: str, seed: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The random tensors of one block ("embed", "layers.i", "head"), reproducible from (seed, block)."""
    cfg = model_config_from_hf(hf_config)
    specs = expected_weights(cfg)[block]
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + sum(map(ord, block)) * 7919 + _block_index(block))
    return {name: random_tensor(name, shape, generator, dtype, device, cfg.norm_plus_one)
            for name, shape in specs.items()}


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


class SyntheticStore:
    """A random-weight model that reads like a StoreReader, built block by block on demand.

    Blocks are generated (and quantized) on `device`, then laid out exactly as a store file would
    be, so that loading it exercises the same placement, transfer and decode paths as a real store
    without writing tens of GB to disk first. Weights are random, never zeros.
    """

    def __init__(self, hf_config: dict, quant: QuantScheme | None = None, dtype: torch.dtype = torch.float16,
                 device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.model_config = dict(hf_config)
        self.quant = quant
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = seed
        self.path = None
        cfg = model_config_from_hf(hf_config)
        shapes = expected_weights(cfg)
        for name, source in tied_head_alias(cfg).items():  # a copy in "head", as tiermem.pack stores it
            shapes["head"][name] = shapes["embed"][source]
        self._shapes = shapes
        self._norm_plus_one = cfg.norm_plus_one  # Gemma: norms start at 0 (1 + w)
        self.block_names = cfg.block_names
        self._nbytes = {b: self._plan(b) for b in self.block_names}
        self._layouts: dict[str, dict] = {}  # block -> manifest-style entry, recorded by read_block

    def _spec(self, name: str, shape: tuple[int, ...]) -> TensorSpec:
        if self.quant is not None and default_should_quantize(name, shape):
            return tuple(shape), self.quant
        return tuple(shape), self.dtype

    def _plan(self, block: str) -> int:
        specs = {n: self._spec(n, s) for n, s in self._shapes[block].items()}
        return planned_block_nbytes(block, specs)

    def block_nbytes(self, name: str) -> int:
        return self._nbytes[name]

    def tensor_specs(self, name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
        return {n: (tuple(s), self._spec(n, s)[1] if self.quant is None or not default_should_quantize(n, s)
                    else self.quant.name) for n, s in self._shapes[name].items()}

    def specs(self, block: str) -> dict[str, TensorSpec]:
        """Stored spec (shape, dtype or quant scheme) of every tensor of `block`."""
        return {n: self._spec(n, s) for n, s in self._shapes[block].items()}

    def tensors(self, block: str) -> dict:
        """The random tensors of `block` (quantized where the store quantizes), on this store's device."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed * 1_000_003 + self.block_names.index(block))
        out = {}
        for name, shape in self._shapes[block].items():
            value = random_tensor(name, shape, generator, self.dtype, self.device, self._norm_plus_one)
            if self.quant is not None and default_should_quantize(name, shape):
                value = quantize(value, self.quant, name)
            out[name] = value
        return out

    def read_block(self, name: str, out: torch.Tensor | None = None, backend=None) -> torch.Tensor:
        """Generate block `name` into `out` (a uint8 CPU tensor of >= block_nbytes) or a new tensor."""
        def allocate(nbytes: int) -> torch.Tensor:
            return out[:nbytes] if out is not None else torch.empty(nbytes, dtype=torch.uint8)

        buf, self._layouts[name] = encode_block(name, self.tensors(name), allocate)
        return buf

    def decode_block(self, name: str, buf: torch.Tensor) -> dict:
        """Views into `buf` of a block generated earlier by read_block."""
        return decode_entry(self._layouts[name], buf, self.quant)


def write_synthetic_store(hf_config: dict, dst: str | Path, quant: QuantScheme | None = None,
                          dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu", seed: int = 0,
                          progress: bool = True) -> Path:
    """Write a random-weight block store of any size straight to disk, one block at a time.

    Only one block is ever in memory (on `device`), so a 111B-parameter int4 store is written with
    a few GB of RAM. Published atomically, like tiermem.pack.
    """
    source = SyntheticStore(hf_config, quant, dtype, device, seed)
    dst = Path(dst)
    total = sum(source.block_nbytes(b) for b in source.block_names)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"write {dst.name}", disable=not progress) as bar, \
            atomic_directory(dst) as tmp:
        writer = StoreWriter(tmp)
        for block in source.block_names:
            block_writer = writer.open_block(block, source.specs(block))
            try:
                for name, value in source.tensors(block).items():
                    block_writer.write(name, value)
            except BaseException:
                block_writer.abort()
                raise
            writer.close_block(block_writer)
            bar.update(source.block_nbytes(block))
        writer.finish(hf_config, quant)
    return dst

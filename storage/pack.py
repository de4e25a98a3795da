"""Streaming conversion of a Hugging Face safetensors checkpoint into a block store.

Tensors are read one at a time, optionally quantized, and written straight into their block's
file, so peak memory is about one tensor (plus its quantization temporaries), never the model.
Everything is written inside `atomic_directory`: a failed pack leaves nothing under the final name.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from tiermem.errors import ConfigError, PackError, StoreError
from tiermem.kernels.quant import QuantScheme, quantize
from tiermem.storage.durable import atomic_directory, why_not_replaceable
from tiermem.storage.format import StoreWriter, TensorSpec
from tiermem.storage.hf import HFCheckpoint
from tiermem.storage.manifest import FORMAT_NAME, MANIFEST_NAME
from tiermem.storage.moe_names import is_gate

ShouldQuantize = Callable[[str, Sequence[int]], bool]

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Final norm / output projection modules (after an optional leading "model."): the "head" block.
HEAD_PREFIXES = ("lm_head.", "norm.", "decoder.final_layer_norm.", "decoder.project_out.")


def block_of(name: str) -> str:
    """Block of an HF tensor name: "layers.{i}" for `layers.{i}.`, "head" for the final norm and
    output projection, "embed" for everything else. Knows no model family."""
    match = _LAYER_RE.search(name)
    if match:
        return f"layers.{int(match.group(1))}"
    bare = name.removeprefix("model.")
    return "head" if bare.startswith(HEAD_PREFIXES) else "embed"


def block_order(blocks: set[str] | Sequence[str]) -> list[str]:
    """Execution order: embed, layers.0 .. layers.{L-1} (numerically), head."""
    def key(block: str) -> tuple[int, int]:
        if block == "embed":
            return (0, 0)
        if block == "head":
            return (2, 0)
        return (1, int(block.split(".")[1]))
    return sorted(set(blocks), key=key)


def default_should_quantize(name: str, shape: Sequence[int]) -> bool:
    """2-D `.weight` matrices of the layers and the LM head; never embeddings, norms, biases or MoE routers and
    gates (a router's [E, D] is tiny, and its rounding would change which experts a token goes to)."""
    if len(shape) != 2 or not name.endswith(".weight") or is_gate(name):
        return False
    return block_of(name).startswith("layers.") or name.removeprefix("model.").startswith("lm_head.")


def plan_specs(
    ckpt: HFCheckpoint,
    quant: QuantScheme | None,
    should_quantize: ShouldQuantize,
    dtype: torch.dtype | None,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, dict[str, TensorSpec]]:
    """Block -> {tensor name -> stored spec}, in execution order; validates every shape up front."""
    by_block: dict[str, dict[str, TensorSpec]] = {}
    for name in [*ckpt.tensor_names, *(aliases or {})]:
        source = (aliases or {}).get(name, name)
        shape, src_dtype = ckpt.tensor_shape(source), ckpt.tensor_dtype(source)
        kind: torch.dtype | QuantScheme = src_dtype
        if quant is not None and src_dtype.is_floating_point and should_quantize(name, shape):
            try:
                quant.check_shape(name, shape)
            except ConfigError as exc:
                raise PackError(str(exc)) from exc
            kind = quant
        elif dtype is not None and src_dtype.is_floating_point:
            kind = dtype
        by_block.setdefault(block_of(name), {})[name] = (shape, kind)
    return {block: by_block[block] for block in block_order(by_block)}


def _convert(tensor: torch.Tensor, name: str, spec: TensorSpec):
    _shape, kind = spec
    if isinstance(kind, QuantScheme):
        return quantize(tensor, kind, name)
    return tensor if tensor.dtype == kind else tensor.to(kind)


def pack_checkpoint(
    src_dir: str | os.PathLike,
    dst_store: str | os.PathLike,
    quant: QuantScheme | str | None = None,
    should_quantize: ShouldQuantize | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    aliases: Mapping[str, str] | None = None,
) -> Path:
    """Convert the HF checkpoint in `src_dir` into a block store at `dst_store`; returns its path.

    quant: None (keep weights dense), a QuantScheme, or "int8"/"int4" (group size 64).
    should_quantize(name, shape) picks the weights to quantize (default: `default_should_quantize`).
    dtype: convert floating tensors that are not quantized (default: keep the checkpoint's dtype).
    aliases: extra tensors to store, {new name: checkpoint tensor it copies} (e.g. a tied lm_head).
    A multimodal checkpoint (Gemma 3's) is packed as its text model, its vision tower left out (storage.multimodal;
    said on stderr where progress is shown).
    """
    if isinstance(quant, str):
        try:
            quant = QuantScheme.from_name(quant)
        except ConfigError as exc:
            raise PackError(str(exc)) from exc
    dst = Path(dst_store)
    src = Path(src_dir).resolve()
    if dst.resolve() == src or dst.resolve() in src.parents:
        raise PackError(f"the store {dst} would replace the checkpoint it is packed from ({src_dir}); choose a "
                        "destination outside it")
    if dst.exists() and not overwrite:
        raise PackError(f"{dst} already exists; choose another destination or pass overwrite=True")
    reason = why_not_replaceable(dst, MANIFEST_NAME, (FORMAT_NAME,))
    if reason:
        raise PackError(f"{reason}: overwrite=True replaces only a tiermem store; choose another destination or "
                        "remove it yourself")
    ckpt = HFCheckpoint(src_dir)
    if ckpt.left_out and progress:
        tqdm.write(f"{src_dir}: packing the text model; {len(ckpt.left_out)} tensors of its vision tower and "
                   "projector are left out", file=sys.stderr)
    aliases = dict(aliases or {})
    missing = sorted(src for src in aliases.values() if src not in ckpt.tensor_names)
    if missing:
        raise PackError(f"aliases refer to tensors {missing} that {src_dir} does not contain")
    plan = plan_specs(ckpt, quant, should_quantize or default_should_quantize, dtype, aliases)
    total = sum(ckpt.tensor_nbytes(aliases.get(n, n)) for specs in plan.values() for n in specs)
    try:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"pack {dst.name}", disable=not progress)
        with bar, atomic_directory(dst, overwrite=overwrite) as tmp:
            writer = StoreWriter(tmp)
            for block, specs in plan.items():
                _write_block(writer, ckpt, block, specs, bar, aliases)
            writer.finish(ckpt.config, quant, ckpt.tokenizer_files)
    except (OSError, StoreError) as exc:
        raise PackError(f"packing {src_dir} into {dst} failed: {exc}") from exc
    return dst


def _write_block(
    writer: StoreWriter, ckpt: HFCheckpoint, block: str, specs: dict[str, TensorSpec], bar: tqdm,
    aliases: Mapping[str, str],
) -> None:
    """Stream one block: each tensor is loaded, converted, written and dropped before the next."""
    block_writer = writer.open_block(block, specs)
    try:
        for name, spec in specs.items():
            source = aliases.get(name, name)
            block_writer.write(name, _convert(ckpt.load_tensor(source), name, spec))
            bar.update(ckpt.tensor_nbytes(source))
    except BaseException:
        block_writer.abort()
        raise
    writer.close_block(block_writer)

"""tiermem: run LLMs whose weights and KV cache do not fit in GPU memory on a single GPU.

Public API (imported lazily so that `import tiermem` stays light and works without a GPU)::

    tiermem.pack(src_hf_dir, dst_store, quant=None | "int8" | "int4", group_size=64)
    m = tiermem.load(store, device="cpu" | "cuda", gpu_memory="24GiB", cpu_memory="64GiB")
    logits = m.forward(input_ids)
    out = m.generate(input_ids, max_new_tokens=32)
    h = tiermem.checkpoint.save_async(state_dict, path)
"""

from __future__ import annotations

import importlib
from typing import Any

from tiermem.errors import (
    BudgetError,
    CheckpointError,
    ChecksumError,
    ConfigError,
    NotACheckpointError,
    PackError,
    StoreError,
    TierIOError,
    TiermemError,
    UnsupportedArchitectureError,
    WeightsError,
)

__version__ = "0.1.0"

_LAZY = {
    "pack": ("tiermem.api", "pack"),
    "load": ("tiermem.api", "load"),
    "Model": ("tiermem.api", "Model"),
    "GenerationSession": ("tiermem.session", "GenerationSession"),
    "checkpoint": ("tiermem.checkpoint", None),
}

__all__ = [
    "BudgetError", "CheckpointError", "ChecksumError", "ConfigError", "NotACheckpointError", "PackError", "StoreError",
    "TierIOError", "TiermemError", "UnsupportedArchitectureError", "WeightsError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tiermem' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)

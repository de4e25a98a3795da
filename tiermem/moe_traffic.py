"""The bytes a MoE decode step must read if only the experts its tokens chose were read.

tiermem streams and reads a sparse layer whole (every expert); the physical limit of a step reads only the chosen
experts. With routing spread evenly, each of a sparse layer's E experts is chosen by at least one of B tokens
(top_k picks each) with probability 1 - (1 - top_k / E) ** B; bench reports the roofline of those bytes beside the
roofline of what tiermem moves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from tiermem.engine.moe import MoeConfig
from tiermem.kernels.quant import QuantScheme


def chosen_fraction(moe: MoeConfig, batch: int) -> float:
    """Expected share of a sparse layer's experts that `batch` tokens choose (uniform routing)."""
    return 1.0 - (1.0 - moe.top_k / moe.num_experts) ** batch


def stored_bytes(shape: Sequence[int], kind: Any, quant: QuantScheme | None) -> int:
    """Bytes of one stored tensor: int4/int8 codes plus fp16 scale and zero per group, or dense elements."""
    if isinstance(kind, str):
        out, inp = shape
        codes, groups = quant.packed_shape(out, inp), quant.groups_shape(out, inp)
        return math.prod(codes) + 2 * 2 * math.prod(groups)
    return math.prod(shape) * kind.itemsize


def unchosen_expert_bytes(specs: Mapping[str, Mapping[str, tuple]], quant: QuantScheme | None, moe: MoeConfig,
                          batch: int) -> dict[str, float]:
    """Block -> expected bytes of its routed experts that no token of a `batch`-token decode step chooses.

    specs: block -> {tensor name -> (shape, dtype or "int4"/"int8")}, as StoreReader.tensor_specs gives them.
    A shared expert (Qwen2-MoE) is always read.
    """
    unchosen = 1.0 - chosen_fraction(moe, batch)
    return {block: unchosen * sum(stored_bytes(shape, kind, quant) for name, (shape, kind) in tensors.items()
                                  if ".experts." in name)
            for block, tensors in specs.items()}

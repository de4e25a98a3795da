"""The bytes a MoE decode step must read if only the experts its tokens chose were read.

tiermem streams and reads a sparse layer whole (every expert); the physical limit of a step reads only the chosen
experts. With routing spread evenly, each of a sparse layer's E experts is chosen by at least one of B tokens
(top_k picks each) with probability 1 - (1 - top_k / E) ** B; bench reports the roofline of those bytes beside the
roofline of what tiermem moves.
"""

from __future__ import annotations

from collections.abc import Mapping

from tiermem.engine.moe import MoeConfig
from tiermem.kernels.quant import QuantScheme
from tiermem.storage.format import stored_nbytes
from tiermem.storage.moe_names import is_routed_expert


def chosen_fraction(moe: MoeConfig, batch: int) -> float:
    """Expected share of a sparse layer's experts that `batch` tokens choose (uniform routing)."""
    return 1.0 - (1.0 - moe.top_k / moe.num_experts) ** batch


def unchosen_expert_bytes(specs: Mapping[str, Mapping[str, tuple]], quant: QuantScheme | None, moe: MoeConfig,
                          batch: int) -> dict[str, float]:
    """Block -> expected bytes of its routed experts that no token of a `batch`-token decode step chooses.

    specs: block -> {tensor name -> (shape, dtype or "int4"/"int8")}, as StoreReader.tensor_specs gives them (a
    quantized weight is stored in `quant`). A shared expert (Qwen2-MoE) is always read.
    """
    unchosen = 1.0 - chosen_fraction(moe, batch)
    return {block: unchosen * sum(stored_nbytes(name, (shape, quant if isinstance(kind, str) else kind))
                                  for name, (shape, kind) in tensors.items() if is_routed_expert(name))
            for block, tensors in specs.items()}

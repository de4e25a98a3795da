"""The text model inside a multimodal checkpoint (Gemma 3's Gemma3ForConditionalGeneration, 4B-27B).

Its language model's tensors are stored under `language_model.` (`language_model.model.layers.0...`,
`language_model.lm_head.weight` where untied), beside a vision tower and a projector that tiermem does not run:
the text tensors are read under the names a text checkpoint has (`model.layers.0...`), the others left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

TEXT_PREFIX = "language_model."
MULTIMODAL_MODEL_TYPES = ("gemma3",)


def text_tensors(config: Mapping[str, Any], names: Iterable[str]) -> tuple[dict[str, str], set[str]]:
    """(text name -> stored name, stored names left out) of a multimodal checkpoint; ({}, set()) for other models."""
    if config.get("model_type") not in MULTIMODAL_MODEL_TYPES:
        return {}, set()
    renamed: dict[str, str] = {}
    left_out: set[str] = set()
    for name in names:
        if name.startswith(TEXT_PREFIX):
            renamed[name.removeprefix(TEXT_PREFIX)] = name
        else:
            left_out.add(name)
    return renamed, left_out

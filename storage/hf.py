"""Hugging Face checkpoint directories: config.json plus one `model.safetensors` or a sharded index.

Only metadata is read up front (config and the safetensors headers); tensors are loaded one at
a time with `safe_open`, so memory holds at most one tensor of the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from tiermem.errors import PackError, StoreError
from tiermem.storage.fused_weights import piece_shape, split_fused
from tiermem.storage.multimodal import text_tensors
from tiermem.storage.safetensors_io import METADATA_KEY, read_header, str_to_dtype

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


class HFCheckpoint:
    """A Hugging Face model directory whose weights are safetensors (single file or sharded)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config: dict = self._read_json(self.path / "config.json", "config.json")
        if not isinstance(self.config, dict):
            raise PackError(f"{self.path / 'config.json'} is not a JSON object")
        self._shard_of: dict[str, str] = self._locate_tensors()
        self._infos: dict[str, dict] = {}
        for shard in sorted(set(self._shard_of.values())):
            self._read_shard_header(shard)
        # fused tensors (transformers 5's experts, Phi-3's projections), seen as separate ones (storage.fused_weights)
        self._pieces = split_fused(self.config, {n: tuple(i["shape"]) for n, i in self._infos.items()})
        # a multimodal checkpoint's text model under a text checkpoint's names, the rest left out (storage.multimodal)
        renamed, self.left_out = text_tensors(self.config, self._shard_of)
        self._pieces |= {name: (stored, None, None) for name, stored in renamed.items()}
        fused = {source for source, _, _ in self._pieces.values()} | self.left_out
        # File order (shard, offset), so that streaming reads each shard front to back.
        self.tensor_names: list[str] = sorted(
            [n for n in self._shard_of if n not in fused] + list(self._pieces),
            key=lambda n: (self._shard_of[self._source(n)], self._infos[self._source(n)]["data_offsets"][0]),
        )

    def _source(self, name: str) -> str:
        """The tensor of the files that holds `name` (itself, or the fused tensor it is a piece of)."""
        return self._pieces[name][0] if name in self._pieces else name

    def _read_json(self, file: Path, what: str) -> object:
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PackError(f"{self.path} has no {what}; is it a Hugging Face model directory?") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PackError(f"cannot read {file}: {exc}") from exc

    def _locate_tensors(self) -> dict[str, str]:
        index_file = self.path / INDEX_FILE
        if index_file.is_file():
            index = self._read_json(index_file, INDEX_FILE)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise PackError(f"{index_file} has no weight_map; the checkpoint index is corrupt")
            for name, shard in weight_map.items():
                if not isinstance(shard, str) or Path(shard).name != shard:
                    raise PackError(f"{index_file} maps {name} to a bad shard name {shard!r}")
            missing = sorted({s for s in weight_map.values() if not (self.path / s).is_file()})
            if missing:
                raise PackError(f"{index_file} names shard files that do not exist: {missing}; "
                                "download the complete checkpoint")
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if single.is_file():
            header, _ = self._header(SINGLE_FILE)
            return {name: SINGLE_FILE for name in header if name != METADATA_KEY}
        raise PackError(
            f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors checkpoints are "
            "supported (convert pytorch_model.bin with transformers: model.save_pretrained(dir))"
        )

    def _header(self, shard: str) -> tuple[dict, int]:
        try:
            return read_header(self.path / shard)
        except StoreError as exc:
            raise PackError(f"checkpoint shard is unreadable: {exc}") from exc

    def _read_shard_header(self, shard: str) -> None:
        header, data_start = self._header(shard)
        for name, shard_of in self._shard_of.items():
            if shard_of != shard:
                continue
            if name not in header:
                raise PackError(f"{self.path / shard} does not contain tensor {name} (named by {INDEX_FILE})")
            self._infos[name] = header[name]
            str_to_dtype(header[name]["dtype"])  # unknown dtypes fail here, not mid-pack

    def _info(self, name: str) -> dict:
        try:
            return self._infos[self._source(name)]
        except KeyError:
            raise PackError(f"tensor {name} is not in the checkpoint {self.path}") from None

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self._info(name)["shape"])
        return piece_shape(self._pieces[name], shape) if name in self._pieces else shape

    def tensor_dtype(self, name: str) -> torch.dtype:
        return str_to_dtype(self._info(name)["dtype"])

    def tensor_nbytes(self, name: str) -> int:
        if name in self._pieces:
            return math.prod(self.tensor_shape(name)) * self.tensor_dtype(name).itemsize
        begin, end = self._info(name)["data_offsets"]
        return end - begin

    def shard_of(self, name: str) -> Path:
        self._info(name)
        return self.path / self._shard_of[self._source(name)]

    def load_tensor(self, name: str) -> torch.Tensor:
        """One tensor, read on its own (the shard is opened and released for this call)."""
        shard = self.shard_of(name)
        try:
            with safe_open(shard, framework="pt") as f:
                if name not in self._pieces:
                    return f.get_tensor(name)
                source, expert, rows = self._pieces[name]
                if expert is None:
                    return f.get_slice(source)[rows[0]:rows[1]].contiguous() if rows else f.get_tensor(source)
                begin, end = rows or (0, self.tensor_shape(name)[0])
                return f.get_slice(source)[expert:expert + 1, begin:end].squeeze(0).contiguous()
        except Exception as exc:  # safetensors raises its own error types
            raise PackError(f"cannot read tensor {name} from {shard}: {exc}") from exc

    @property
    def tokenizer_files(self) -> list[Path]:
        """Tokenizer (and generation config) files present in the directory."""
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

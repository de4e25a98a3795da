"""Group-wise asymmetric int4/int8 quantization layout, shared by the torch reference and CUDA.

A 2-D weight W[out, in] is cut along the input dimension into groups of `group_size` columns.
Per (row, group): zero = min, scale = (max - min) / (2**bits - 1), both stored as fp16, and
q = round((w - zero) / scale) in [0, 2**bits - 1], so that w ≈ q * scale + zero.

Packed bytes (`qdata`, uint8, row-major, one row per output feature):
- int8: qdata[o, i] = q[o, i]                                       -> [out, in]
- int4: qdata[o, j] = q[o, 2j] | (q[o, 2j + 1] << 4)  (low nibble first) -> [out, in // 2]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.config import check_integer
from tiermem.errors import ConfigError

SUPPORTED_BITS = (4, 8)
FP16_EPS = 2.0**-11  # unit roundoff of fp16 (normal range)
FP16_TINY = 2.0**-25  # absolute rounding error of fp16 subnormals


@dataclass(frozen=True)
class QuantScheme:
    """Bits per weight and group size; `name` is "int4" or "int8"."""

    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"quantization bits must be 4 or 8, got {self.bits}")
        check_integer("group_size", self.group_size)
        if self.group_size < 2 or self.group_size % 2:
            raise ConfigError(f"group_size must be an even number >= 2, got {self.group_size}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @classmethod
    def from_name(cls, name: str | None, group_size: int = 64) -> QuantScheme | None:
        """None -> None (no quantization); "int4"/"int8" -> scheme."""
        if name is None:
            return None
        if name not in ("int4", "int8"):
            raise ConfigError(f"unknown quantization {name!r}: use None, 'int8' or 'int4'")
        return cls(bits=int(name[3:]), group_size=group_size)

    def packed_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features, in_features * self.bits // 8

    def groups_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features, in_features // self.group_size

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) != 2 or shape[1] % self.group_size:
            raise ConfigError(
                f"cannot quantize {name} of shape {tuple(shape)} with group_size {self.group_size}: "
                "the input dimension must be a multiple of the group size; choose a group_size "
                "that divides it"
            )


@dataclass
class QuantizedWeight:
    """A quantized 2-D weight: packed codes plus per-group fp16 scale and zero (see module doc)."""

    qdata: torch.Tensor  # uint8 [out, in * bits / 8]
    scale: torch.Tensor  # fp16 [out, in / group_size]
    zero: torch.Tensor  # fp16 [out, in / group_size]
    scheme: QuantScheme
    shape: tuple[int, int]  # (out, in) of the original weight

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scale, self.zero))

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedWeight:
        return QuantizedWeight(
            qdata=self.qdata.to(device, non_blocking=non_blocking),
            scale=self.scale.to(device, non_blocking=non_blocking),
            zero=self.zero.to(device, non_blocking=non_blocking),
            scheme=self.scheme,
            shape=self.shape,
        )


def quantize(weight: torch.Tensor, scheme: QuantScheme, name: str = "weight") -> QuantizedWeight:
    """Quantize W[out, in] group-wise along `in` (computed in fp32)."""
    scheme.check_shape(name, tuple(weight.shape))
    out_features, in_features = weight.shape
    levels = 2**scheme.bits - 1
    w = weight.detach().to(torch.float32).reshape(out_features, -1, scheme.group_size)  # [O, G, g]
    w_min = w.amin(dim=-1, keepdim=True)  # [O, G, 1]
    w_max = w.amax(dim=-1, keepdim=True)
    scale = ((w_max - w_min) / levels).to(torch.float16)
    zero = w_min.to(torch.float16)
    # Quantize against the fp16-rounded scale/zero actually stored, so the only error is rounding.
    scale32 = scale.to(torch.float32)
    safe_scale = torch.where(scale32 > 0, scale32, torch.ones_like(scale32))
    q = torch.round((w - zero.to(torch.float32)) / safe_scale).clamp_(0, levels).to(torch.uint8)
    q = q.reshape(out_features, in_features)  # [O, I]
    if scheme.bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)  # [O, I/2]
    return QuantizedWeight(
        qdata=q.contiguous(),
        scale=scale.reshape(out_features, -1).contiguous(),
        zero=zero.reshape(out_features, -1).contiguous(),
        scheme=scheme,
        shape=(out_features, in_features),
    )


def unpack_codes(qw: QuantizedWeight) -> torch.Tensor:
    """The integer codes q[out, in] as uint8."""
    if qw.scheme.bits == 8:
        return qw.qdata
    low = qw.qdata & 0x0F  # [O, I/2]
    high = qw.qdata >> 4
    return torch.stack((low, high), dim=-1).reshape(qw.shape)  # [O, I]


def error_bound(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Per-element bound on |W - dequantize(quantize(W))| implied by the scheme.

    Rounding to the nearest code costs scale/2; the fp16 rounding of zero and scale adds
    |min| * eps + levels * scale * eps (plus an absolute 2**-25 each where they are fp16
    subnormals); fp32 arithmetic adds a few ulps of max|w|.
    """
    out_features = weight.shape[0]
    levels = 2**scheme.bits - 1
    w = weight.detach().to(torch.float32).reshape(out_features, -1, scheme.group_size)
    w_min = w.amin(dim=-1, keepdim=True)
    w_max = w.amax(dim=-1, keepdim=True)
    scale = (w_max - w_min) / levels * (1 + FP16_EPS) + FP16_TINY
    bound = scale / 2 + w_min.abs() * FP16_EPS + FP16_TINY + levels * (scale * FP16_EPS + FP16_TINY)
    bound = bound + 4 * torch.finfo(torch.float32).eps * w.abs().amax(dim=-1, keepdim=True)
    return bound.expand_as(w).reshape(weight.shape)

"""Frozen settings objects, the parsing of human-readable sizes such as "24GiB", and integer checks of options."""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

from tiermem.errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def check_integer(name: str, value: object, minimum: int | None = None) -> None:
    """ConfigError unless `value` is an integer (a bool is not) and, with `minimum`, at least that: a cast would
    have turned 1.5 into 1 and "3" into a TypeError deep inside."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        at_least = "" if minimum is None else f" >= {minimum}"
        raise ConfigError(f"{name} must be an integer{at_least}, got {value!r}")


def parse_size(value: int | float | str | None) -> int | None:
    """Bytes from 1234, "512MiB", "24GiB", "1.5GB"; None stays None (no limit).

    Bare "G"/"M"/"K" are binary (GiB/MiB/KiB), as in most ML tooling.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"size must be a number of bytes or a string like '24GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"size must not be negative, got {value!r}")
        return int(value)
    match = _SIZE_RE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"cannot read size {value!r}: write a number of bytes or a number with a unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '24GiB'"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(nbytes: int) -> str:
    """Short binary-unit rendering: 1536 -> '1.50 KiB'."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Budgets:
    """Hard memory limits in bytes; None means no limit."""

    gpu_memory: int | None = None
    cpu_memory: int | None = None

    @classmethod
    def parse(cls, gpu_memory: int | str | None = None, cpu_memory: int | str | None = None) -> Budgets:
        return cls(gpu_memory=parse_size(gpu_memory), cpu_memory=parse_size(cpu_memory))


@dataclass(frozen=True)
class PrefetchConfig:
    """How far ahead the prefetcher reads and with how many I/O threads."""

    lookahead: int = 2
    io_threads: int = 4

    def __post_init__(self) -> None:
        if self.lookahead < 1:
            raise ConfigError(f"lookahead must be >= 1, got {self.lookahead}")
        if self.io_threads < 1:
            raise ConfigError(f"io_threads must be >= 1, got {self.io_threads}")

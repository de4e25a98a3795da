"""Kernel dispatch: the functions model code calls. Today every op is the torch reference."""

from tiermem.kernels.reference import apply_rope, dequantize, linear, rms_norm, silu_mul

__all__ = ["apply_rope", "dequantize", "linear", "rms_norm", "silu_mul"]

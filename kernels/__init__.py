"""Compute: torch reference kernels (the spec and the CPU path) and CuPy/CUDA kernels."""

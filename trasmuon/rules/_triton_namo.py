"""The Triton program of NAMO and NAMO-D (placeholder while the kernels are refactored)."""

"""Triton kernels for the TrasMuon optimizer step (SPEC.md, "Kernel data flow").

One module per op, each holding its ``@triton.jit`` kernel next to its launcher; the eager
twin of every op lives in :mod:`trasmuon.reference`.
"""

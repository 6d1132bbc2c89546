"""Triton kernels for the TrasMuon optimizer step (the fused data flow of docs/backends.md).

One module per op, each holding its ``@triton.jit`` kernel next to its launcher; the eager
twin of every op lives in ``trasmuon.reference``. This package imports only torch, triton
and its own modules: everything the rule defines (coefficient schedules, ranks, epsilons)
is passed in by the caller.
"""

import os

import torch

# The kernels run in Triton's CPU interpreter when no GPU is present. The variable must be
# set before any kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""What the benchmark suites share: building a model's parameter set and each optimizer."""

from __future__ import annotations

from collections.abc import Callable

import torch

import trasmuon

from .shapes import ParamSpec, gpt2

# The GPU scripts' CPU dry run (run_gpu.sh SMOKE=1): GPT-2's structure at 1 x 32, which
# Triton's interpreter steps in about a second.
SMOKE_MODEL = "gpt2-micro"
SMOKE_SPECS = gpt2(1, 32, vocab=64, ctx=16)

# name -> (matrix rule of ours, or None for a torch.optim baseline)
OURS = {"trasmuon": trasmuon.TrasMuon, "normuon": trasmuon.NorMuon,
        "muon": trasmuon.Muon, "namo": trasmuon.NAMO, "namo_d": trasmuon.NAMOD,
        "adamw": trasmuon.AdamW}


def make_params(specs: list[ParamSpec], device, dtype, seed: int = 0):
    """Random parameters with random gradients: (matrices, others) lists."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    matrices, others = [], []
    for shape, count, kind in specs:
        for _ in range(count):
            p = torch.nn.Parameter(
                (torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype))
            p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
            (matrices if kind == "matrix" else others).append(p)
    return matrices, others


def impls_for(device: torch.device) -> list[str]:
    """Implementations to compare: ours on each backend that runs here, and the peers."""
    ours = list(OURS)
    if device.type == "cuda":
        ours += [f"{name}-triton" for name in OURS if name != "adamw"]
    return [*ours, "torch-muon", "torch-adamw"]


def make_step(impl: str, matrices, others, *, tensor_lr: bool = False) -> tuple[Callable[[], None], list]:
    """A zero-argument function taking one optimizer step, and the optimizers it steps.
    ``impl``: a key of ``OURS`` (eager backend), the same with ``-triton``, or with
    ``-triton-cudagraph`` (``cuda_graph=True``: the optimizer captures its own step), or a
    peer. ``tensor_lr``: ours with lr as a device tensor (what a hand-made capture needs)."""
    device = matrices[0].device
    backend, cuda_graph = "eager", False
    if impl.endswith("-triton-cudagraph"):
        impl, backend, cuda_graph = impl.removesuffix("-triton-cudagraph"), "triton", True
    if impl.endswith("-triton"):
        impl, backend = impl.removesuffix("-triton"), "triton"
    if impl in OURS:
        groups = [{"params": matrices}, {"params": others, "rule": "adamw"}]
        lr = torch.tensor(1e-3, device=device) if tensor_lr else 1e-3
        opts = [OURS[impl](groups, lr=lr, backend=backend, cuda_graph=cuda_graph)]
    elif impl == "torch-muon":
        opts = [torch.optim.Muon(matrices, lr=1e-3),
                torch.optim.AdamW(others, lr=1e-3, fused=device.type == "cuda")]
    elif impl == "torch-adamw":
        opts = [torch.optim.AdamW(matrices + others, lr=1e-3, fused=device.type == "cuda")]
    else:
        raise ValueError(f"unknown implementation {impl!r}")

    def step() -> None:
        for opt in opts:
            opt.step()

    return step, opts


def state_bytes(opts) -> int:
    """Bytes of optimizer state actually allocated: the unique storages behind every state
    tensor (views of one buffer count once)."""
    seen, total = set(), 0
    for opt in opts:
        for state in opt.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    storage = value.untyped_storage()
                    if storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        total += storage.nbytes()
    return total

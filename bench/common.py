"""What the benchmark suites share: building a model's parameter set and each optimizer."""

from __future__ import annotations

import importlib
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

# Peers from other packages, optional: name -> (module, class, pip name). Only the matrices go
# to them (with their defaults at lr 1e-3); the other params step on torch.optim.AdamW, as for
# "torch-muon", so that every row compares the same matrix work.
PEERS = {"pto-muon": ("pytorch_optimizer", "Muon", "pytorch-optimizer"),
         "pto-normuon": ("pytorch_optimizer", "NorMuon", "pytorch-optimizer"),
         "heavyball-muon": ("heavyball", "Muon", "heavyball")}


class PeerNotInstalled(ImportError):
    """A peer's package is not importable here; ``str()`` starts with "not installed: "."""


def _peer_matrix_optimizer(impl: str, matrices, *, compile_peers: bool):
    module, cls, pip_name = PEERS[impl]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise PeerNotInstalled(
            f"not installed: {pip_name} ({exc}; pip install {pip_name}, or on a machine "
            "without network bench/fetch_peers.sh beforehand)") from exc
    if module == "pytorch_optimizer":
        # Its Muon family takes param groups flagged use_muon (False: its own AdamW).
        return getattr(mod, cls)([{"params": matrices, "use_muon": True}], lr=1e-3)
    if not compile_peers:
        # heavyball torch.compiles its fused functions by default (a minute on a CPU): a
        # module-wide switch, off for dry runs whose times mean nothing.
        mod.utils.compile_mode = None
    # (its default frees p.grad in step(): repeated steps on the same gradients, as a benchmark
    # takes, need it kept; the step computes the same)
    return getattr(mod, cls)(matrices, lr=1e-3, consume_grad=False)


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


def make_step(impl: str, matrices, others, *, tensor_lr: bool = False,
              compile_peers: bool = True) -> tuple[Callable[[], None], list]:
    """A zero-argument function taking one optimizer step, and the optimizers it steps.
    ``impl``: a key of ``OURS`` (eager backend), the same with ``-triton``, or with
    ``-triton-cudagraph`` (``cuda_graph=True``: the optimizer captures its own step), or a
    peer ("torch-muon", "torch-adamw", a key of ``PEERS``; :class:`PeerNotInstalled` when its
    package is missing). ``tensor_lr``: ours with lr as a device tensor (what a hand-made
    capture needs). ``compile_peers=False``: heavyball without its torch.compile (dry runs)."""
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
    elif impl in PEERS:
        opts = [_peer_matrix_optimizer(impl, matrices, compile_peers=compile_peers),
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

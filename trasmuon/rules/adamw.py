"""AdamW: bias-corrected Adam with decoupled weight decay (docs/rule.md, "The baselines"),
torch.optim.AdamW's defaults. The rule of every parameter that is not a matrix.

Eager: ``reference.adamw_foreach_step_`` on the bucket (torch ``_foreach_*`` ops).
Triton: ``trasmuon_kernels.adamw``, one launch for the whole bucket, reading lr and each
tensor's step from device memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .. import reference as ref
from . import Hyperparameter, Program, Rule, StateEntry, register
from ._checks import in_range, valid_betas, valid_lr
from ._matrix import refuse_moved_grads_while_capturing

if TYPE_CHECKING:
    from ..plan import Bucket, StepPlan

LR = Hyperparameter("lr", 1e-3, valid_lr, "a finite float >= 0 or a one-element tensor")
BETAS = Hyperparameter("betas", (0.9, 0.999), valid_betas, "a pair (beta1, beta2) with each in [0, 1)")
EPS = Hyperparameter("eps", 1e-8, in_range(0.0, math.inf, lo_open=True), "a finite float > 0")
WEIGHT_DECAY = Hyperparameter("weight_decay", 1e-2, in_range(0.0, math.inf), "a finite float >= 0")
KEYS = ("lr", "betas", "eps", "weight_decay")

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class AdamWRule(Rule):
    name = "adamw"
    hyperparameters = (LR, BETAS, EPS, WEIGHT_DECAY)
    state_names = frozenset({"exp_avg", "exp_avg_sq"})

    def state_entries(self, group: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[StateEntry, ...]:
        return (StateEntry("exp_avg", "param"), StateEntry("exp_avg_sq", "param", nonnegative=True))

    def program(self, bucket: Bucket, backend: str, plan: StepPlan | None = None) -> Program:
        if backend == "triton":
            return TritonAdamW(bucket, plan)
        return EagerAdamW(bucket)

    def unsupported_by_triton(self, group: Mapping[str, Any], param: Any, grad: Any) -> str | None:
        if param.dtype not in _TRITON_DTYPES:
            return f"its dtype is {param.dtype} (the AdamW kernel takes fp32, bf16 and fp16 params)"
        if grad.dtype not in _TRITON_DTYPES:
            return f"its gradient dtype is {grad.dtype}"
        if not (param.is_contiguous() and grad.is_contiguous()):
            return "it (or its gradient) is not contiguous"
        return None


class EagerAdamW(Program):
    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    def run(self) -> None:
        b = self.bucket
        hp = b.hyper()
        lr = hp["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr.detach().reshape(()).to(device=b.device, dtype=b.state_dtype)
        else:
            lr = float(lr)
        ref.adamw_foreach_step_(
            b.views(), b.grads(), b.rule_states(), b.steps(), lr,
            betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"],
        )


class TritonAdamW(Program):
    """One prepared launch of the multi-tensor kernel; gradient addresses are refreshed in
    its table when they move (``begin``)."""

    def __init__(self, bucket: Bucket, plan: StepPlan) -> None:
        self.bucket = bucket
        self.plan = plan
        self.launches: list[Any] = []
        self._grad_ptrs: tuple[int, ...] = ()
        scalars = plan.devices
        self._lr_slot = scalars.lr_slot(bucket.device, bucket.group_index, bucket.group)
        self._counter = scalars.reserve_counters(bucket.device, bucket.states)

    def build(self) -> None:
        """Prepare the launch (after the plan allocated the device scalars)."""
        from trasmuon_kernels.adamw import prepare_adamw

        b = self.bucket
        hp = b.hyper()
        scalars = self.plan.devices
        grads = b.grads()
        states = b.rule_states()
        self.launches = prepare_adamw(
            b.views(), grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            steps=scalars.counter_view(b.device, self._counter, b.count),
            lr=scalars.lr_tensor(b.device, self._lr_slot),
            betas=tuple(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"],
        )
        self._grad_ptrs = tuple(g.data_ptr() for g in grads)

    def begin(self) -> None:
        grads = self.bucket.grads()
        ptrs = tuple(g.data_ptr() for g in grads)
        if ptrs != self._grad_ptrs:
            refuse_moved_grads_while_capturing(grads[0])
            for launch in self.launches:
                launch.update_grads(grads)
            self._grad_ptrs = ptrs

    def run(self) -> None:
        for launch in self.launches:
            launch()


ADAMW = register(AdamWRule())

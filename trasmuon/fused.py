"""The Triton backend: one optimizer step for buckets of same-shape matrices, the kernel data
flow of docs/backends.md with one launch per stage per bucket.

A bucket is the matrix params of one param group with one rule, shape, dtype, device and
step count that have a gradient this step. Buckets are formed at every step by a pass over
the params in group order (cheap, and it follows param groups and params that gain or lose
gradients without any cache to invalidate). Per bucket:

1. ``momentum_energy_pass_``: M updated in place, X = bf16(M or the Nesterov blend), the
   column energies (of M or G) and ||X||_F^2;
2. ``newton_schulz`` on the stacked X, with the last epilogue reducing O's row sums;
3. ``row_stats_``: v, the row scale and eta_hat;
4. ``gate_stage_`` for gated matrices (after ``column_energy`` of O_base when
   ``energy_source="update"``);
5. ``update_pass_``: W <- (1 - lr wd) W - eta_hat rowscale_i c_j O_ij.

Muon buckets run 1 (no energies), 2 and 5 with Muon's step size. State stays per parameter
in ``optimizer.state`` (so checkpoints move between backends): the momentum is read through
a device table of pointers; the small per-matrix vectors (``row_v`` and the gate state) are
views into one stacked tensor per bucket, re-stacked (one copy) only when a bucket's
membership changes or a state dict was loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import reference as ref


def kernels_available() -> bool:
    try:
        import trasmuon_kernels.newton_schulz
        import trasmuon_kernels.update  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    from trasmuon_kernels._common import interpreting as _interpreting

    return _interpreting()


def unsupported_reason(param: Tensor, grad: Tensor, group: dict[str, Any]) -> str | None:
    """Why a matrix cannot take the fused path (None when it can)."""
    if not (param.is_cuda or (param.device.type == "cpu" and interpreting())):
        return f"it is on {param.device} (the kernels need CUDA, or TRITON_INTERPRET=1 on CPU)"
    if group["ns_dtype"] != torch.bfloat16:
        return f"ns_dtype={group['ns_dtype']} (the Newton-Schulz kernels are bf16)"
    if param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"its dtype is {param.dtype} (the kernels take fp32, bf16 and fp16 params)"
    if grad.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"its gradient dtype is {grad.dtype}"
    if grad.stride() != param.stride() or not param.is_contiguous():
        return "it (or its gradient) is not contiguous"
    return None


def stacked_state(
    states: Sequence[dict[str, Tensor]], key: str, like: Tensor, fill: float = 0.0
) -> Tensor:
    """One contiguous (B, ...) tensor whose rows are ``states[i][key]``.

    When the per-parameter tensors already are consecutive rows of one buffer (the usual
    case from the second step on), that buffer is returned without a copy; otherwise the
    values are stacked into a new buffer (missing ones: ``fill``, shaped, typed and placed
    like ``like``) and every ``states[i][key]`` is replaced by a view of its row.
    """
    present = [s[key] for s in states if key in s]
    if present and len(present) == len(states):
        first = present[0]
        row = first.numel()
        size = first.element_size()
        base = first.data_ptr()
        consecutive = all(
            t.is_contiguous() and t.dtype == first.dtype and t.device == first.device
            and t.shape == first.shape and t.data_ptr() == base + i * row * size
            and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            for i, t in enumerate(present)
        )
        if consecutive and first.untyped_storage().nbytes() >= (
            first.storage_offset() + len(states) * row) * size:
            return first.as_strided((len(states), *first.shape),
                                    (row, *first.stride()), first.storage_offset())
    stack = torch.stack([s[key] if key in s else torch.full_like(like, fill) for s in states])
    for i, s in enumerate(states):
        s[key] = stack[i]
    return stack


class FusedMatrixStep:
    """Runs the matrix rules of one optimizer step on the Triton kernels."""

    def __init__(self) -> None:
        # Pointer tables of long-lived tensors (params, momenta), keyed by their addresses.
        self._tables: dict[tuple[int, ...], Any] = {}

    def _bucket_of(self, tensors: list[Tensor], cache: bool):
        from trasmuon_kernels._common import TensorBucket

        if not cache:
            return TensorBucket.of(tensors)
        key = tuple(t.data_ptr() for t in tensors)
        bucket = self._tables.get(key)
        if bucket is None or any(a is not b for a, b in zip(bucket.tensors, tensors, strict=True)):
            if len(self._tables) > 256:
                self._tables.clear()
            bucket = TensorBucket.of(tensors)
            self._tables[key] = bucket
        return bucket

    def run(self, buckets: list[dict[str, Any]], gate_keys: Sequence[str]) -> list[dict[str, Tensor]]:
        """Step every bucket; return, per matrix in bucket order, what diagnostics read."""
        from trasmuon_kernels.gate import gate_stage_
        from trasmuon_kernels.momentum_energy import column_energy, momentum_energy_pass_
        from trasmuon_kernels.newton_schulz import newton_schulz
        from trasmuon_kernels.update import row_stats_, update_pass_

        outputs: list[dict[str, Tensor]] = []
        for bucket in buckets:
            group, rule, params, grads = bucket["group"], bucket["rule"], bucket["params"], bucket["grads"]
            states, step, lr, gate_on = bucket["states"], bucket["step"], bucket["lr"], bucket["gate_on"]
            count = len(params)
            d_out, d_in = params[0].shape
            beta1, beta2 = group["betas"]
            source = group["energy_source"] if gate_on else None
            pass1 = momentum_energy_pass_(
                self._bucket_of(grads, cache=False),
                self._bucket_of([s["momentum"] for s in states], cache=True),
                beta1, nesterov=group["nesterov"],
                energy_source=source if source in ("momentum", "grad") else None,
            )
            param_bucket = self._bucket_of(params, cache=True)
            # The kernels take what the rule defines (schedule, rank, epsilons) as arguments.
            schedule = ref.ns_schedule(group["ns_coefficients"], group["ns_steps"])
            if rule == "muon":
                ortho = newton_schulz(pass1.x, schedule, group["eps"], fro_sumsq=pass1.x_sqnorm)
                step_size = ref.muon_lr(lr, group["adjust_lr_fn"], d_out, d_in)
                update_pass_(param_bucket, ortho, lr=lr, weight_decay=group["weight_decay"],
                             step_size=step_size)
                outputs.extend({"step_size": torch.as_tensor(step_size)} for _ in params)
                continue
            rowsumsq = torch.empty(count, d_out, dtype=torch.float32, device=params[0].device)
            ortho = newton_schulz(pass1.x, schedule, group["eps"], fro_sumsq=pass1.x_sqnorm,
                                  row_sumsq_out=rowsumsq)
            rowscale, eta = row_stats_(
                stacked_state(states, "row_v", rowsumsq[0]), rowsumsq, d_in=d_in, beta2=beta2,
                eps=group["eps"], scale=group["scale"], lr=lr, eta_eps=ref.ETA_HAT_EPS,
            )
            gate = energy = None
            if gate_on:
                energy = pass1.energy if pass1.energy is not None else column_energy(ortho, row_scale=rowscale)
                firsts = ["energy_ref" not in s for s in states]
                first: bool | Tensor = firsts[0]
                if any(f != firsts[0] for f in firsts):
                    first = torch.tensor(firsts, dtype=torch.bool).to(energy.device, non_blocking=True)
                keys = ["c_ema", "energy_ref"] + (
                    ["sf_lr2_sum", "sf_c_lr2_sum", "c_last"] if group["schedule_free"] else [])
                like = {"energy_ref": eta[0], "sf_lr2_sum": eta[0]}
                gate_state = {k: stacked_state(states, k, like.get(k, energy[0])) for k in keys}
                gate_kwargs = {k: group[k] for k in gate_keys if k != "energy_quantile"}
                gate = gate_stage_(gate_state, energy, step, lr, first=first,
                                   k=ref.quantile_rank(d_in, group["energy_quantile"]),
                                   sf_eps=ref.SCHEDULE_FREE_EPS, **gate_kwargs)
            update_pass_(param_bucket, ortho, lr=lr, weight_decay=group["weight_decay"],
                         eta_hat=eta, rowscale=rowscale, col_gate=gate)
            for i in range(count):
                outputs.append({"eta_hat": eta[i], "energy": None if energy is None else energy[i],
                                "gate": None if gate is None else gate[i]})
        return outputs

"""The step of :class:`trasmuon.optimizer.MatrixOptimizer`: collecting the work and checking it
(nothing changes when something is wrong), choosing each bucket's backend, building the step
plan (:mod:`trasmuon.plan`) and running it, and the diagnostics (docs/architecture.md)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import plan as planning
from . import reference as ref
from .plan import (
    Bucket,
    DTensor,
    StepPlan,
    fingerprint,
    init_state,
)
from .rules import get_rule


def kernels_available() -> bool:
    """Whether the Triton kernels can be imported (``pip install '.[triton]'``)."""
    try:
        import trasmuon_kernels.newton_schulz
        import trasmuon_kernels.update  # noqa: F401
    except ImportError:
        return False
    return True

def _first_expert(p: Tensor) -> int:
    """The global index of the first expert of this rank's part of a stacked parameter."""
    if not isinstance(p, DTensor):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0])

def _simulating() -> bool:
    """Inside ``trasmuon_kernels._launch.simulate_device``: CPU tensors stand for a GPU's (a
    host-time measurement with a stand-in Triton driver)."""
    import sys

    launch = sys.modules.get("trasmuon_kernels._launch")
    return launch is not None and launch.simulated_props() is not None

def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

def _describe(t: Tensor) -> str:
    kind = "DTensor" if isinstance(t, DTensor) else "tensor"
    return f"{t.dtype} {kind} of shape {tuple(t.shape)} on {t.device}"


class StepDriver:
    """The step half of ``MatrixOptimizer`` (a mixin: its state is the optimizer's)."""

    def _collect(self) -> list[tuple[int, int, Tensor, Tensor, str]]:
        """Every (group, index, param, grad, rule) with a gradient, after checking every group
        and gradient: a bad input found half way through a step must not leave some params
        updated and others not."""
        name = type(self).__name__
        work = []
        seen: dict[int, tuple[int, int]] = {}
        for gi, group in enumerate(self.param_groups):
            self._check_group(gi, group)
            self._check_lr(gi, group)
            # Keys set on the group after it was added (a scheduler's, a typo) that its
            # rule(s) do not read.
            self._warn_unused_keys(gi, group, set(group))
            for pi, p in enumerate(group["params"]):
                first = seen.setdefault(id(p), (gi, pi))
                if first != (gi, pi):
                    raise ValueError(f"{name}: {self._label(gi, pi)} is the same tensor as "
                                     f"{self._label(*first)}; list each parameter once")
                grad = p.grad
                if grad is None or p.numel() == 0:
                    continue
                if grad.is_sparse or grad.layout != torch.strided:
                    raise RuntimeError(f"{name}: {self._label(gi, pi)} has a {grad.layout} "
                                       "gradient; only dense (strided) gradients are supported")
                if torch.is_complex(p) or torch.is_complex(grad):
                    raise RuntimeError(f"{name}: {self._label(gi, pi)} is complex; complex "
                                       "parameters and gradients are not supported")
                if not p.is_floating_point():
                    raise RuntimeError(f"{name}: {self._label(gi, pi)} has dtype {p.dtype}; only "
                                       "floating point parameters are supported")
                if (grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device
                        or isinstance(grad, DTensor) != isinstance(p, DTensor)):
                    raise RuntimeError(
                        f"{name}: {self._label(gi, pi)} is a {_describe(p)}, but its gradient "
                        f"is a {_describe(grad)}; a gradient must match its parameter's shape, "
                        "dtype, device and type (as torch requires when .grad is assigned)")
                rule = get_rule(self.rule_of(group, p))
                self._check_matrix(gi, pi, p, rule, group)
                self._check_shape(gi, pi, p, rule, group)
                self._check_state_dtype(gi, pi, p, rule, group)
                self._check_layout(gi, pi, p, rule)
                work.append((gi, pi, p, grad, rule.name))
        return work

    def _check_lrs(self) -> None:
        for gi, group in enumerate(self.param_groups):
            self._check_lr(gi, group)

    def _check_finite_grads(self, work: list[tuple[int, int, Tensor, Tensor, str]]) -> None:
        by_device: dict[torch.device, list[Tensor]] = {}
        for _, _, _, grad, _ in work:
            g = planning.local(grad)
            by_device.setdefault(g.device, []).append(torch.isfinite(g).all())
        # One host sync per device when every gradient is finite.
        if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
            return
        for gi, pi, _, grad, _ in work:
            if not bool(torch.isfinite(planning.local(grad)).all()):
                raise RuntimeError(
                    f"{type(self).__name__}: {self._label(gi, pi)} has a non-finite gradient "
                    "(NaN or Inf); the step was not taken and no weight or optimizer state was "
                    "changed")

    def _backend_for(self, rule: Any, group: dict[str, Any], p: Tensor, grad: Tensor) -> tuple[str, str | None]:
        """The backend of one parameter and, when the Triton backend was asked for and cannot
        take it, why (which is warned about)."""
        lp, lg = planning.local(p), planning.local(grad)
        if self.backend == "eager" or (self.backend == "auto" and not lp.is_cuda):
            return "eager", None
        if not kernels_available():
            return "eager", "triton or trasmuon_kernels cannot be imported"
        if not (lp.is_cuda or (lp.device.type == "cpu" and (_interpreting() or _simulating()))):
            return "eager", f"it is on {lp.device} (the kernels need CUDA, or TRITON_INTERPRET=1 on the CPU)"
        orientation, flatten = group.get("orientation", "out_in"), group.get("flatten", False)
        view = planning.matrix_view(lp, orientation, flatten) if rule.matrix else lp
        grad_view = planning.matrix_view(lg, orientation, flatten) if rule.matrix else lg
        reason = rule.unsupported_by_triton(group, view, grad_view)
        if reason is None and lg.stride() != lp.stride():
            reason = "its gradient has other strides than the parameter"
        if reason is None and not lp.is_contiguous():
            reason = "it is not contiguous"
        return ("eager", reason) if reason else ("triton", None)

    def _build_plan(self, key: tuple, work: list[tuple[int, int, Tensor, Tensor, str]]) -> StepPlan:
        from . import distributed as dist_support

        buckets: dict[tuple, Bucket] = {}
        fallbacks: list[tuple[int, int, str]] = []
        # Each parameter's index in the optimizer (the same on every rank): with bf16
        # momentum, part of its stochastic-rounding key.
        first_index = [0]
        for g in self.param_groups:
            first_index.append(first_index[-1] + len(g["params"]))
        for gi, pi, p, grad, rule_name in work:
            group = self.param_groups[gi]
            rule = get_rule(rule_name)
            rounds = rule.matrix and group.get("state_dtype") == torch.bfloat16
            backend, reason = self._backend_for(rule, group, p, grad)
            if reason:
                fallbacks.append((gi, pi, reason))
            lp, lg = planning.local(p), planning.local(grad)
            stacked = rule.matrix and group["stacked"]
            if rule.matrix:
                orientation, flatten = group["orientation"], group["flatten"]
                shape = planning.matrix_shape(tuple(p.shape), orientation, flatten, stacked)
                strides = (lp.stride(), lg.stride()) if backend == "triton" else None
                placement = (p.device_mesh, tuple(p.placements)) if isinstance(p, DTensor) else None
                # A stack sharded inside its experts is a bucket of its own: its members are
                # matrices first_matrix.. of its exchange entry, and its sums over rows sit at
                # those rows of a buffer laid out the same on every rank.
                inside = stacked and dist_support.stack_sharded_inside(self, p, orientation)
                bkey = (gi, rule_name, shape, p.dtype, grad.dtype, lp.device, backend, placement,
                        strides, stacked, id(p) if inside else None)
            else:
                orientation, flatten, shape = "out_in", False, ()
                bkey = (gi, rule_name, p.dtype, grad.dtype, lp.device, backend)
            bucket = buckets.get(bkey)
            if bucket is None:
                if rule.matrix or group["rule"] is not None:
                    hyper = (lambda g=group: g)
                else:
                    hyper = (lambda g=group: self.fallback_adamw(g))
                bucket = buckets[bkey] = Bucket(
                    rule=rule, backend=backend, group_index=gi, group=group, params=[], labels=[],
                    states=[], device=lp.device, param_dtype=p.dtype, grad_dtype=grad.dtype,
                    hyper=hyper, orientation=orientation, flatten=flatten, shape=shape,
                    experts=[] if stacked else None)
                if rule.matrix:
                    dist_support.describe_layout(self, bucket, p)
            if stacked:  # one member per expert this rank holds, all of a stack in a row
                count, fresh = lp.shape[0], {}
                first = _first_expert(p)
                for e in range(count):
                    if rounds:
                        bucket.sr_keys.append(ref.sr_matrix_key(group["seed"], first_index[gi] + pi, first + e))
                    bucket.params.append(p)
                    bucket.experts.append(e)
                    bucket.labels.append(f"{self._label(gi, pi)} expert {first + e}")
                    bucket.states.append(planning.ExpertState(self.state[p], e, count, fresh))
                continue
            if rounds:
                bucket.sr_keys.append(ref.sr_matrix_key(group["seed"], first_index[gi] + pi))
            bucket.params.append(p)
            bucket.labels.append(self._label(gi, pi))
            bucket.states.append(self.state[p])
        self._warn_fallbacks(fallbacks)
        adamw = [b for b in buckets.values() if not b.rule.matrix]
        matrices = [b for b in buckets.values() if b.rule.matrix]
        plan = StepPlan(key, adamw, matrices)
        for b in plan.buckets:
            init_state(b)
            if b.backend == "eager":
                for s in b.states:  # host counters (a device step would sync at every read)
                    if s["step"].device.type != "cpu":
                        s["step"] = s["step"].detach().cpu()
        plan.allocate_reductions()
        for b in plan.buckets:
            b.program = b.rule.program(b, b.backend, plan)
            b.program.collect = self.diagnostics_enabled
        plan.devices.allocate()
        for b in plan.buckets:
            build = getattr(b.program, "build", None)
            if build is not None:
                build()
        dist_support.plan_exchanges(self, plan)
        return plan

    def _warn_fallbacks(self, fallbacks: list[tuple[int, int, str]]) -> None:
        """One warning for all parameters that run eager although the Triton backend was asked
        for, the first time this set of (parameter, reason) occurs."""
        if not fallbacks:
            return
        signature = frozenset((gi, pi, reason) for gi, pi, reason in fallbacks)
        if signature in self._fallback_warned:
            return
        self._fallback_warned.add(signature)
        by_reason: dict[str, list[str]] = {}
        for gi, pi, reason in fallbacks:
            by_reason.setdefault(reason, []).append(self._label(gi, pi))
        lines = []
        for reason, labels in by_reason.items():
            shown = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
            noun = "parameter" if len(labels) == 1 else "parameters"
            lines.append(f"{len(labels)} {noun} because {reason}: {shown}")
        warnings.warn(
            f"{type(self).__name__}: backend={self.backend!r}, but these run on the eager "
            "backend: " + "; ".join(lines),
            stacklevel=4,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimization step. ``closure`` re-evaluates the model and returns the loss.

        Under ``torch.compile`` the step is a graph break (docs/architecture.md).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step()
        return loss

    @torch.compiler.disable
    def _step(self) -> None:
        from . import distributed as dist_support

        self.comm_stats = dist_support.CommStats()
        for group in self.param_groups:  # (a group switched to bf16 state since it was added)
            self._resolve_seed(group)
        key = fingerprint(self.param_groups)
        plan = self._plan
        current = plan is not None and plan.key == key
        if dist_support.needs_agreement(self, plan if current else None):
            # Every rank validates locally and the agreement carries the verdict, so that a
            # bad input on one rank is raised by all of them (never a hang in a collective).
            work, error = None, None
            try:
                work = self._collect()
            except (ValueError, TypeError, RuntimeError) as exc:
                error = exc
            dist_support.agree(self, work, error, key)
        else:
            work = None if current else self._collect()
            if current:
                self._check_lrs()
            if self.check_finite:
                self._check_finite_grads(work if work is not None else self._collect())
        if not current:
            plan = self._plan = self._build_plan(key, work)
        if self.cuda_graph:
            self._capture.step(self, plan)
        else:
            self._run(plan)

    def _run(self, plan: StepPlan) -> None:
        plan.begin()
        self._run_stages(plan)
        plan.end()

    def _run_stages(self, plan: StepPlan) -> None:
        from . import distributed as dist_support

        dist_support.run_matrix_stages(self, plan)

    def diagnostics(self) -> dict[str, dict[str, float]]:
        """Per-parameter observables of the last step (paper Appendix G), as floats.

        Needs ``diagnostics=True`` at construction. The step itself keeps device tensors and
        never syncs; this method reads them all back at once. Keys of a gated matrix:
        ``eta_hat``, ``energy_cur`` and ``energy_ref`` (E_cur, E_ref), ``r_q95`` and
        ``r_max`` (of r_j = E_j / (E_ref + energy_eps)), ``c_min`` and ``c_mean`` (the
        applied gate), ``triggered_frac`` (share of columns with r_j > clip_trigger, or
        with c_j < 1 when the gate is continuous), ``c_ema_min``, and ``c_avg_mean`` with
        ``schedule_free``. An ungated matrix (NorMuon, too few columns) has ``eta_hat``;
        a Muon matrix has ``step_size``. AdamW params have no entry.
        """
        if not self.diagnostics_enabled:
            raise RuntimeError(
                f"{type(self).__name__}: diagnostics are off; construct the optimizer "
                "with diagnostics=True"
            )
        out: dict[str, dict[str, float]] = {}
        plan = self._plan
        if plan is None:
            return out
        per_param: dict[int, list[tuple[str, dict[str, Tensor]]]] = {}
        for b in plan.matrices:
            for i, (p, values) in enumerate(zip(b.params, b.program.diagnostics(), strict=False)):
                # A stack has one entry per expert: "name[e]" (e global under sharding).
                suffix = "" if b.experts is None else f"[{_first_expert(p) + b.experts[i]}]"
                per_param.setdefault(id(p), []).append((suffix, values))
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                names = group.get("param_names")
                label = names[pi] if names is not None else f"group{gi}.param{pi}"
                for suffix, values in per_param.get(id(p), []):
                    keys = list(values)
                    floats = torch.stack([torch.as_tensor(values[k]).detach().double().cpu()
                                          for k in keys]).tolist()
                    out[label + suffix] = dict(zip(keys, floats, strict=True))
        return out

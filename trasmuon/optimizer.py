"""TrasMuon, NorMuon, Muon and AdamW: one ``torch.optim.Optimizer`` pipeline, four rules.

Every param group may name its ``rule``; a group that names none sends 2D params to the
optimizer's matrix rule and all others to AdamW (docs/rule.md, "Parameters that are not matrices").
Each group holds every hyperparameter of every rule (the union schema below), so a group
may switch rule and pick up the optimizer's defaults for the keys it does not set.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import fused
from . import reference as ref

RULES = ("trasmuon", "normuon", "muon", "adamw")
MATRIX_RULES = ("trasmuon", "normuon", "muon")
BACKENDS = ("eager", "triton", "auto")
# How a 2D parameter stores its matrix: "out_in" is nn.Linear's (out_features, in_features),
# "in_out" is transformers' Conv1D (in_features, out_features). The matrix rules always act
# on the (out, in) matrix: rows are output features, columns input features.
ORIENTATIONS = ("out_in", "in_out")

# The union of all rules' hyperparameters, with TrasMuon's defaults (docs/rule.md, "Defaults").
GROUP_DEFAULTS: dict[str, Any] = {
    "rule": None,
    "lr": 1e-3,
    "betas": (0.95, 0.95),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "nesterov": False,
    "ns_coefficients": ref.TRASMUON_NS_COEFFICIENTS,
    "ns_steps": 5,
    "ns_dtype": torch.bfloat16,
    "scale": 0.2,
    "adjust_lr_fn": None,
    "clip": True,
    "clip_alpha": 1.0,
    "clip_min": 0.7,
    "clip_trigger": 3.0,
    "clip_period": 4,
    "clip_min_cols": 8,
    "clip_beta": 0.9,
    "energy_beta": 0.99,
    "energy_quantile": 0.5,
    "energy_eps": 1e-12,
    "energy_source": "momentum",
    "warmup_steps": 0,
    "schedule_free": True,
    "sf_mix": 0.3,
    "orientation": "out_in",
}

# The hyperparameters each rule reads. A key a group sets that its rule does not read is
# kept but ignored, so it is warned about once (a typo such as ``weight_deacy`` would
# otherwise change nothing, silently).
_ADAMW_KEYS = frozenset({"lr", "betas", "eps", "weight_decay"})
_NS_KEYS = frozenset({"nesterov", "ns_coefficients", "ns_steps", "ns_dtype", "orientation"})
RULE_KEYS: dict[str, frozenset[str]] = {
    "adamw": _ADAMW_KEYS,
    "muon": _ADAMW_KEYS | _NS_KEYS | {"adjust_lr_fn"},
    "normuon": _ADAMW_KEYS | _NS_KEYS | {"scale"},
    "trasmuon": _ADAMW_KEYS | _NS_KEYS | {"scale", "clip", "clip_alpha", "clip_min",
                                          "clip_trigger", "clip_period", "clip_min_cols",
                                          "clip_beta", "energy_beta", "energy_quantile",
                                          "energy_eps", "energy_source", "warmup_steps",
                                          "schedule_free", "sf_mix"},
}
# Keys of a param group that are not hyperparameters of any rule: the group's structure, and
# what torch's LR schedulers (OneCycleLR, CyclicLR, SWALR, ...) store in groups.
_STRUCTURE_KEYS = frozenset({"params", "param_names", "rule"})
_SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum",
                             "max_momentum", "swa_lr"})

# Options given to the constructor (attribute name -> default), kept by load_state_dict,
# deepcopy and pickling.
_OPTION_DEFAULTS: dict[str, Any] = {
    "backend": "auto", "check_finite": False, "diagnostics_enabled": False,
}

# Keys of the union schema that gate_stage_ takes as keyword arguments.
_GATE_KEYS = (
    "warmup_steps",
    "clip_period",
    "clip_alpha",
    "clip_min",
    "clip_trigger",
    "clip_beta",
    "energy_beta",
    "energy_quantile",
    "energy_eps",
    "schedule_free",
    "sf_mix",
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def check(v: object) -> bool:
        if not _is_real(v):
            return False
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        return above and below

    return check


def _valid_betas(v: object) -> bool:
    return (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(_in_range(0.0, 1.0, hi_open=True)(b) for b in v)
    )


def _valid_ns_coefficients(v: object) -> bool:
    if ref.is_ns_triple(v):
        return all(math.isfinite(x) for x in v)
    return (
        isinstance(v, (tuple, list))
        and len(v) > 0
        and all(ref.is_ns_triple(t) and all(math.isfinite(x) for x in t) for t in v)
    )


# (key, check, what a valid value is): checked for every group at construction, when a
# group is added, and again at every step (schedulers and users edit groups in place).
_CHECKS: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("rule", lambda v: v is None or v in RULES, f"None or one of {RULES}"),
    ("betas", _valid_betas, "a pair (beta1, beta2) with each in [0, 1)"),
    ("eps", _in_range(0.0, math.inf, lo_open=True), "a finite float > 0"),
    ("weight_decay", _in_range(0.0, math.inf), "a finite float >= 0"),
    ("nesterov", lambda v: isinstance(v, bool), "a bool"),
    ("ns_coefficients", _valid_ns_coefficients, "one (a, b, c) triple or a sequence of them"),
    ("ns_steps", lambda v: _is_int(v) and 1 <= v <= 100, "an int in [1, 100]"),
    ("ns_dtype", lambda v: v in ref.NS_DTYPES, f"one of {ref.NS_DTYPES}"),
    ("scale", _in_range(0.0, math.inf, lo_open=True), "a finite float > 0"),
    ("adjust_lr_fn", lambda v: v in ref.MUON_LR_ADJUSTMENTS, f"one of {ref.MUON_LR_ADJUSTMENTS}"),
    ("clip", lambda v: isinstance(v, bool), "a bool"),
    ("clip_alpha", _in_range(0.0, math.inf), "a finite float >= 0"),
    ("clip_min", _in_range(0.0, 1.0, lo_open=True), "a float in (0, 1]"),
    ("clip_trigger", lambda v: v is None or _in_range(0.0, math.inf)(v), "None or a float >= 0"),
    ("clip_period", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("clip_min_cols", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("clip_beta", _in_range(0.0, 1.0, hi_open=True), "a float in [0, 1)"),
    ("energy_beta", _in_range(0.0, 1.0, hi_open=True), "a float in [0, 1)"),
    ("energy_quantile", _in_range(0.0, 1.0, lo_open=True), "a float in (0, 1]"),
    ("energy_eps", _in_range(0.0, math.inf, lo_open=True), "a finite float > 0"),
    ("energy_source", lambda v: v in ref.ENERGY_SOURCES, f"one of {ref.ENERGY_SOURCES}"),
    ("warmup_steps", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    ("schedule_free", lambda v: isinstance(v, bool), "a bool"),
    ("sf_mix", _in_range(0.0, 1.0), "a float in [0, 1]"),
    ("orientation", lambda v: v in ORIENTATIONS, f"one of {ORIENTATIONS}"),
)


def oriented(tensor: Tensor, orientation: str) -> Tensor:
    """The (out, in) view of a matrix stored with ``orientation`` (see ``ORIENTATIONS``)."""
    return tensor.mT if orientation == "in_out" else tensor


# State tensors with one entry per element of the parameter: stored like the parameter,
# read through ``oriented`` by the matrix rules.
_PER_ELEMENT_STATE = ("momentum", "exp_avg", "exp_avg_sq")


class _OrientedState(MutableMapping):
    """A matrix's state as the (out, in) rule sees it: per-element tensors through their
    ``.mT`` view (in-place updates land in the stored tensor), everything else as stored."""

    def __init__(self, state: MutableMapping[str, Any]) -> None:
        self._state = state

    def __getitem__(self, key: str) -> Any:
        value = self._state[key]
        return value.mT if key in _PER_ELEMENT_STATE else value

    def __setitem__(self, key: str, value: Any) -> None:
        self._state[key] = value.mT if key in _PER_ELEMENT_STATE else value

    def __delitem__(self, key: str) -> None:
        del self._state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def expected_state_shapes(shape: tuple[int, ...], rule: str, orientation: str) -> dict[str, tuple[int, ...]]:
    """The shape of every state tensor ``rule`` keeps for a parameter of ``shape`` (stored
    shape; ``orientation`` says which dim is d_out for a matrix rule)."""
    shapes: dict[str, tuple[int, ...]] = {"step": ()}
    if rule == "adamw":
        return {**shapes, "exp_avg": shape, "exp_avg_sq": shape}
    shapes["momentum"] = shape
    if rule == "muon" or len(shape) != 2:
        return shapes
    d_out, d_in = shape[::-1] if orientation == "in_out" else shape
    shapes["row_v"] = (d_out,)
    if rule == "trasmuon":
        shapes.update(c_ema=(d_in,), sf_c_lr2_sum=(d_in,), c_last=(d_in,), energy_ref=(),
                      sf_lr2_sum=())
    return shapes


@dataclass
class MatrixJob:
    """One matrix parameter's work in a step, between the momentum and update stages."""

    param: Tensor
    grad_wide: Tensor  # the gradient in state dtype
    ns_input: Tensor  # what Newton-Schulz orthogonalizes (M, or the Nesterov blend)
    group: dict[str, Any]
    rule: str
    state: dict[str, Tensor]
    step: int
    lr: float | Tensor
    source: Tensor | None = None  # the parameter itself when ``param`` is its (out, in) view

    @property
    def key(self) -> Tensor:
        """The parameter this job updates (what ``optimizer.state`` is keyed by)."""
        return self.source if self.source is not None else self.param


class MatrixOptimizer(Optimizer):
    """The shared pipeline of :class:`TrasMuon`, :class:`NorMuon`, :class:`Muon` and
    :class:`AdamW`. Subclasses set ``matrix_rule`` (the rule of 2D params in groups that
    name none) and their constructor defaults; everything else lives here."""

    matrix_rule: ClassVar[str] = "trasmuon"

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
    ) -> None:
        name = type(self).__name__
        if backend not in BACKENDS:
            raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton" and not fused.kernels_available():
            raise RuntimeError(
                f"{name}: backend='triton' needs triton and trasmuon_kernels to import; "
                "use backend='eager' or 'auto'"
            )
        if not isinstance(check_finite, bool):
            raise ValueError(f"{name}: check_finite must be a bool, got {check_finite!r}")
        if not isinstance(diagnostics, bool):
            raise ValueError(f"{name}: diagnostics must be a bool, got {diagnostics!r}")
        unknown = set(defaults) - set(GROUP_DEFAULTS)
        if unknown:
            raise TypeError(f"{name}: unknown hyperparameters {sorted(unknown)}")
        self.backend = backend
        self.check_finite = check_finite
        self.diagnostics_enabled = diagnostics
        self._diagnostics: dict[Tensor, dict[str, Tensor]] = {}
        self._fused = fused.FusedMatrixStep()
        self._fallback_warned: set[frozenset] = set()
        self._key_warned: set[tuple[int, str]] = set()
        lr = defaults.get("lr", GROUP_DEFAULTS["lr"])
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        super().__init__(params, {**GROUP_DEFAULTS, **defaults})
        # torch.optim.Optimizer.__setstate__ adds this key; add it now so that a deepcopy
        # or an unpickled optimizer has the same defaults as the original.
        self.defaults.setdefault("differentiable", False)

    # ----------------------------------------------------------------------------------
    # torch.optim.Optimizer plumbing
    # ----------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({key: getattr(self, key) for key in _OPTION_DEFAULTS})
        state["_diagnostics"] = self._diagnostics
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls this with only "state" and "param_groups": the
        # options set at construction must stay as they are (a resume must not switch
        # check_finite off or the backend back to "auto"). Unpickling and deepcopy bring
        # them in ``state``; the defaults are for pickles older than an option.
        for key, default in _OPTION_DEFAULTS.items():
            if key not in state:
                state[key] = self.__dict__.get(key, default)
        state.setdefault("_diagnostics", self.__dict__.get("_diagnostics", {}))
        state["_fused"] = fused.FusedMatrixStep()
        state.setdefault("_fallback_warned", self.__dict__.get("_fallback_warned", set()))
        state.setdefault("_key_warned", self.__dict__.get("_key_warned", set()))
        super().__setstate__(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        given = set(param_group) if isinstance(param_group, dict) else set()
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            self._check_group(index, self.param_groups[index], check_lr_value=True)
            self._warn_unused_keys(index, self.param_groups[index], given)
            rule = self.param_groups[index]["rule"]
            if rule in MATRIX_RULES:
                for i, p in enumerate(self.param_groups[index]["params"]):
                    if p.ndim != 2:
                        raise ValueError(
                            f"{type(self).__name__}: {self._label(index, i)} has shape "
                            f"{tuple(p.shape)}, but rule {rule!r} needs a 2D parameter"
                        )
        except Exception:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping each state tensor's saved dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's
        dtype; for a bf16 parameter that would turn the float32 momentum into bf16. The
        pre-hooks and post-hooks run here around the base implementation so that post-hooks
        see the restored state.
        """
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        for hook in pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) == len(saved_groups) and all(
            len(g["params"]) == len(sg["params"]) for g, sg in zip(groups, saved_groups, strict=True)
        ):  # otherwise torch's own check below raises its error
            self._check_loaded_state(state_dict)
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_to_param = dict(zip(saved_ids, params, strict=True))
        for pid, saved in state_dict["state"].items():
            param = id_to_param[pid]
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    device = value.device if key == "step" else param.device
                    self.state[param][key] = value.detach().to(device=device, copy=True)
                elif key == "step":  # older checkpoints may hold a plain number
                    self.state[param][key] = torch.tensor(float(value), dtype=torch.float32)
        for group in self.param_groups:  # checkpoints from before a key existed
            for key in GROUP_DEFAULTS:
                group.setdefault(key, self.defaults[key])
        self._diagnostics.clear()
        for hook in post_hooks.values():
            hook(self)

    # ----------------------------------------------------------------------------------
    # Checks
    # ----------------------------------------------------------------------------------
    def _rule_keys(self, group: dict[str, Any]) -> frozenset[str]:
        """The hyperparameters the params of ``group`` read: its rule's, or, for a group
        that names no rule, the matrix rule's and AdamW's."""
        rule = group.get("rule")
        if rule in RULE_KEYS:
            return RULE_KEYS[rule]
        return RULE_KEYS[self.matrix_rule] | RULE_KEYS["adamw"]

    def _warn_unused_keys(self, index: int, group: dict[str, Any], keys: Iterable[str]) -> None:
        """Warn once per (group, key) about keys that no rule of this group reads."""
        known = self._rule_keys(group) | _STRUCTURE_KEYS | _SCHEDULER_KEYS
        for key in sorted(set(keys) - known):
            if (index, key) in self._key_warned:
                continue
            self._key_warned.add((index, key))
            rule = group.get("rule")
            rules = (f"rule {rule!r}" if rule else
                     f"rules {self.matrix_rule!r} (2D params) and 'adamw' (the others)")
            hint = "" if key in GROUP_DEFAULTS else " (no rule of this optimizer knows it)"
            warnings.warn(
                f"{type(self).__name__}: param group {index} sets {key!r}, which its "
                f"{rules} do not read{hint}; the value is kept but has no effect",
                stacklevel=4,
            )

    def _check_loaded_state(self, state_dict: dict[str, Any]) -> None:
        """Refuse a state dict whose tensors do not fit the params (before anything changes):
        torch's load_state_dict checks only the number of params per group."""
        name = type(self).__name__
        where: dict[Any, tuple[int, int, dict[str, Any]]] = {}
        for gi, saved_group in enumerate(state_dict["param_groups"]):
            for pi, pid in enumerate(saved_group["params"]):
                where[pid] = (gi, pi, saved_group)
        for pid, saved in state_dict["state"].items():
            if pid not in where:
                raise ValueError(f"{name}: load_state_dict: state for param id {pid!r}, "
                                 "which no param group of the state dict lists")
            gi, pi, saved_group = where[pid]
            param = self.param_groups[gi]["params"][pi]
            rule = saved_group.get("rule") or (self.matrix_rule if param.ndim == 2 else "adamw")
            orientation = saved_group.get("orientation", "out_in")
            expected = expected_state_shapes(tuple(param.shape), rule, orientation)
            for key, value in saved.items():
                if not isinstance(value, Tensor) or key not in expected:
                    continue
                want = expected[key]
                ok = value.numel() == 1 if key == "step" else tuple(value.shape) == want
                if not ok:
                    raise ValueError(
                        f"{name}: load_state_dict: state {key!r} of {self._label(gi, pi)} "
                        f"has shape {tuple(value.shape)}, but the parameter has shape "
                        f"{tuple(param.shape)} and rule {rule!r} keeps {key!r} as "
                        f"{want if want else 'a scalar'}; nothing was loaded"
                    )

    def _label(self, group_index: int, param_index: int) -> str:
        group = self.param_groups[group_index]
        names = group.get("param_names")
        if names is not None:
            return f"parameter {names[param_index]!r} (group {group_index})"
        return f"parameter {param_index} of param group {group_index}"

    def _check_group(self, index: int, group: dict[str, Any], check_lr_value: bool) -> None:
        name = type(self).__name__
        for key, check, expected in _CHECKS:
            value = group[key]
            if not check(value):
                raise ValueError(
                    f"{name}: param group {index}: {key} must be {expected}, got {value!r}"
                )
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"{name}: param group {index}: Tensor lr must be 1-element")
            if check_lr_value and not (lr.detach().cpu().item() >= 0.0):
                raise ValueError(f"{name}: param group {index}: lr must be >= 0, got {lr}")
        elif not _in_range(0.0, math.inf)(lr):
            raise ValueError(
                f"{name}: param group {index}: lr must be a finite float >= 0, got {lr!r}"
            )

    def rule_of(self, group: dict[str, Any], param: Tensor) -> str:
        """The rule that updates ``param`` in ``group``."""
        if group["rule"] is not None:
            return group["rule"]
        return self.matrix_rule if param.ndim == 2 else "adamw"

    def _collect(self) -> list[tuple[int, dict[str, Any], list[tuple[int, Tensor, Tensor, str]]]]:
        """Check every group and gradient before anything is changed (a bad input found
        half way through a step must not leave some params updated and others not)."""
        name = type(self).__name__
        work = []
        for gi, group in enumerate(self.param_groups):
            self._check_group(gi, group, check_lr_value=False)
            # Keys added to the group after construction (no rule's key at all).
            self._warn_unused_keys(gi, group, set(group) - set(GROUP_DEFAULTS))
            items = []
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None or p.numel() == 0:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(
                        f"{name}: {self._label(gi, pi)} has a sparse gradient; "
                        "sparse gradients are not supported"
                    )
                if torch.is_complex(p) or torch.is_complex(grad):
                    raise RuntimeError(
                        f"{name}: {self._label(gi, pi)} is complex; complex parameters "
                        "and gradients are not supported"
                    )
                if not p.is_floating_point():
                    raise RuntimeError(
                        f"{name}: {self._label(gi, pi)} has dtype {p.dtype}; only floating "
                        "point parameters are supported"
                    )
                rule = self.rule_of(group, p)
                if rule in MATRIX_RULES and p.ndim != 2:
                    raise ValueError(
                        f"{name}: {self._label(gi, pi)} has shape {tuple(p.shape)}, but "
                        f"rule {rule!r} needs a 2D parameter"
                    )
                items.append((pi, p, grad, rule))
            work.append((gi, group, items))
        return work

    def _check_finite_grads(self, work) -> None:
        by_device: dict[torch.device, list[Tensor]] = {}
        for _, _, items in work:
            for _, _, grad, _ in items:
                by_device.setdefault(grad.device, []).append(torch.isfinite(grad).all())
        # One host sync per device when every gradient is finite.
        if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
            return
        for gi, _, items in work:
            for pi, _, grad, _ in items:
                if not bool(torch.isfinite(grad).all()):
                    raise RuntimeError(
                        f"{type(self).__name__}: {self._label(gi, pi)} has a non-finite "
                        "gradient (NaN or Inf); the step was not taken and no weight or "
                        "optimizer state was changed"
                    )

    # ----------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimization step. ``closure`` re-evaluates the model and returns the loss.

        Stages, for all params of all groups: AdamW params are updated directly; matrix
        params get their momentum update (docs/rule.md step 2), then all of them are orthogonalized
        by one ``_orthogonalize`` call (step 3: the place where a distributed or fused
        backend takes over), then each gets the rest of its rule (steps 1, 4-12).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._collect()
        if self.check_finite:
            self._check_finite_grads(work)
        jobs: list[MatrixJob] = []
        buckets: dict[tuple, dict[str, Any]] = {}
        fallbacks: list[tuple[int, int, Tensor, str]] = []
        for gi, group, items in work:
            adamw: dict[torch.device, tuple[list, list, list, list]] = {}
            orientation = group["orientation"]
            for pi, p, grad, rule in items:
                state = self._init_state(p, group, rule)
                state["step"] += 1
                step = int(state["step"].item())  # a CPU tensor: no device sync
                lr = self._lr_for(group, p)
                if rule == "adamw":
                    lists = adamw.setdefault(p.device, ([], [], [], []))
                    for values, item in zip(lists, (p, grad, state, step), strict=True):
                        values.append(item)
                    continue
                # The rule acts on the (out, in) matrix: views of params stored (in, out).
                view, grad_view = oriented(p, orientation), oriented(grad, orientation)
                rule_state = _OrientedState(state) if orientation == "in_out" else state
                reason = self._fused_path_blocker(p, grad, group)
                if reason is None:
                    gate_on = rule == "trasmuon" and ref.gate_is_on(
                        group["clip"], view.shape[1], group["clip_min_cols"])
                    key = (gi, rule, tuple(view.shape), p.dtype, grad.dtype, p.device, step)
                    bucket = buckets.setdefault(key, {
                        "group": group, "rule": rule, "step": step, "lr": lr, "gate_on": gate_on,
                        "params": [], "grads": [], "states": [], "keys": []})
                    bucket["params"].append(view)
                    bucket["grads"].append(grad_view)
                    bucket["states"].append(rule_state)
                    bucket["keys"].append(p)
                    continue
                if reason:
                    fallbacks.append((gi, pi, p, reason))
                ns_input, grad_wide = ref.momentum_stage_(grad_view, rule_state, group["betas"][0], group["nesterov"])
                jobs.append(MatrixJob(view, grad_wide, ns_input, group, rule, rule_state, step, lr,
                                      source=p if view is not p else None))
            for params, grads, states, steps in adamw.values():
                lr = self._lr_for(group, params[0])
                ref.adamw_foreach_step_(
                    params, grads, states, steps, lr,
                    betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                )
        self._warn_fallbacks(fallbacks)
        if buckets:
            outs = self._fused.run(list(buckets.values()), _GATE_KEYS)
            if self.diagnostics_enabled:
                ordered = [(b, i) for b in buckets.values() for i in range(len(b["params"]))]
                for (b, i), out in zip(ordered, outs, strict=True):
                    p, state = b["keys"][i], b["states"][i]
                    self._diagnostics[p] = (
                        out if b["rule"] == "muon"
                        else _matrix_diagnostics(out, state, b["group"], b["gate_on"]))
        for job, ortho in zip(jobs, self._orthogonalize(jobs), strict=True):
            self._update_matrix(job, ortho)
        return loss

    def _fused_path_blocker(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> str | None:
        """Why this matrix does not run on the Triton kernels this step: None when it does,
        "" when the backend does not ask for them, else the reason (which is warned about)."""
        if self.backend == "eager" or (self.backend == "auto" and not p.is_cuda):
            return ""
        if not fused.kernels_available():
            return "triton or trasmuon_kernels cannot be imported"
        if type(self)._orthogonalize is not MatrixOptimizer._orthogonalize:
            return f"{type(self).__name__} orthogonalizes in its own way (e.g. distributed)"
        return fused.unsupported_reason(p, grad, group)

    def _warn_fallbacks(self, fallbacks: list[tuple[int, int, Tensor, str]]) -> None:
        """One warning for all matrices that run eager although the Triton backend was asked
        for, the first time this set of (matrix, reason) occurs."""
        if not fallbacks:
            return
        signature = frozenset((id(p), reason) for _, _, p, reason in fallbacks)
        if signature in self._fallback_warned:
            return
        self._fallback_warned.add(signature)
        by_reason: dict[str, list[str]] = {}
        for gi, pi, _, reason in fallbacks:
            by_reason.setdefault(reason, []).append(self._label(gi, pi))
        lines = []
        for reason, labels in by_reason.items():
            shown = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
            lines.append(f"{len(labels)} matrices because {reason}: {shown}")
        warnings.warn(
            f"{type(self).__name__}: backend={self.backend!r}, but these run on the eager "
            "backend: " + "; ".join(lines),
            stacklevel=3,
        )

    def _orthogonalize(self, jobs: list[MatrixJob]) -> list[Tensor]:
        """Newton-Schulz for every matrix of this step (docs/rule.md step 3), in job order."""
        return [
            ref.newton_schulz(
                job.ns_input,
                ref.ns_schedule(job.group["ns_coefficients"], job.group["ns_steps"]),
                job.group["eps"],
                job.group["ns_dtype"],
            )
            for job in jobs
        ]

    def _row_reduce(self, job: MatrixJob) -> ref.RowReduce:
        """How a partial sum over this matrix's local rows becomes the full sum: nothing to
        do here; a row-sharded (FSDP) subclass all-reduces."""
        return ref._no_reduce

    def _full_shape(self, job: MatrixJob) -> tuple[int, int]:
        """The (d_out, d_in) of the whole matrix (a sharded subclass reports the global one)."""
        return tuple(job.param.shape)

    def _update_matrix(self, job: MatrixJob, ortho: Tensor) -> None:
        group, p = job.group, job.param
        if job.rule == "muon":
            ref.muon_update_stage_(
                p, ortho, job.lr, weight_decay=group["weight_decay"],
                adjust_lr_fn=group["adjust_lr_fn"], shape=self._full_shape(job),
            )
            if self.diagnostics_enabled:
                d_out, d_in = self._full_shape(job)
                step_size = ref.muon_lr(job.lr, group["adjust_lr_fn"], d_out, d_in)
                self._diagnostics[job.key] = {"step_size": torch.as_tensor(step_size)}
            return
        shape = self._full_shape(job)
        gate_on = job.rule == "trasmuon" and ref.gate_is_on(group["clip"], shape[1], group["clip_min_cols"])
        out = ref.trasmuon_update_stage_(
            p, job.grad_wide, ortho, job.state, job.step, job.lr,
            betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
            scale=group["scale"], gate_on=gate_on,
            gate_kwargs={k: group[k] for k in _GATE_KEYS},
            energy_source=group["energy_source"], shape=shape, row_reduce=self._row_reduce(job),
        )
        if self.diagnostics_enabled:
            self._diagnostics[job.key] = _matrix_diagnostics(out, job.state, group, gate_on)

    def _init_state(self, p: Tensor, group: dict[str, Any], rule: str) -> dict[str, Tensor]:
        state = self.state[p]
        sdt = ref.state_dtype(p.dtype)
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if rule == "adamw":
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
            return state
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
        if rule == "muon":
            return state
        d_out, d_in = oriented(p, group["orientation"]).shape
        if "row_v" not in state:
            state["row_v"] = torch.zeros(d_out, dtype=sdt, device=p.device)
        if rule == "trasmuon" and ref.gate_is_on(group["clip"], d_in, group["clip_min_cols"]):
            ref.init_gate_state(state, (), d_in, group["schedule_free"], p.device, sdt)
        return state

    @staticmethod
    def _lr_for(group: dict[str, Any], p: Tensor) -> float | Tensor:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            return lr.detach().reshape(()).to(device=p.device, dtype=ref.state_dtype(p.dtype))
        return float(lr)

    # ----------------------------------------------------------------------------------
    # Diagnostics
    # ----------------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, dict[str, float]]:
        """Per-parameter observables of the last step (paper Appendix G), as floats.

        Needs ``diagnostics=True`` at construction. The step itself stores device tensors
        and never syncs; this method reads them all back at once. Keys of a gated matrix:
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
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                values = self._diagnostics.get(p)
                if values is None:
                    continue
                names = group.get("param_names")
                label = names[pi] if names is not None else f"group{gi}.param{pi}"
                keys = list(values)
                floats = torch.stack([values[k].detach().double().cpu() for k in keys]).tolist()
                out[label] = dict(zip(keys, floats, strict=True))
        return out


def _matrix_diagnostics(
    out: dict[str, Tensor | None], state: dict[str, Tensor], group: dict[str, Any], gate_on: bool
) -> dict[str, Tensor]:
    values = {"eta_hat": out["eta_hat"].reshape(())}
    if not gate_on:
        return values
    energy, gate = out["energy"], out["gate"]
    d_in = energy.shape[-1]
    energy_ref = state["energy_ref"]
    ratio = ref.energy_ratio(energy, energy_ref, group["energy_eps"])
    trigger = group["clip_trigger"]
    triggered = ratio > trigger if trigger is not None else gate < 1.0
    values.update(
        energy_cur=ref.kth_smallest(energy, ref.quantile_rank(d_in, group["energy_quantile"])),
        energy_ref=energy_ref.clone(),
        r_q95=ref.kth_smallest(ratio, ref.quantile_rank(d_in, 0.95)),
        r_max=ratio.max(),
        c_min=gate.min(),
        c_mean=gate.mean(),
        triggered_frac=triggered.to(ratio.dtype).mean(),
        c_ema_min=state["c_ema"].min(),
    )
    if group["schedule_free"]:
        values["c_avg_mean"] = ref.schedule_free_average(
            state["sf_lr2_sum"], state["sf_c_lr2_sum"]
        ).mean()
    return values


def _backend_kwargs(backend: str, check_finite: bool, diagnostics: bool) -> dict[str, Any]:
    return {"backend": backend, "check_finite": check_finite, "diagnostics": diagnostics}


class TrasMuon(MatrixOptimizer):
    """TrasMuon (arXiv 2602.13498): NorMuon-style orthogonalized momentum with a global
    RMS-calibrated step size and an energy-based column gate that damps bursty columns.

    2D params take the TrasMuon rule and all others AdamW (with the group's lr, betas, eps,
    weight_decay), unless their param group names a ``rule``. Arguments and defaults follow
    docs/rule.md, which maps each one to the paper's equation and to the code.
    """

    matrix_rule = "trasmuon"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        ns_coefficients: Any = ref.TRASMUON_NS_COEFFICIENTS,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
        scale: float = 0.2,
        clip: bool = True,
        clip_alpha: float = 1.0,
        clip_min: float = 0.7,
        clip_trigger: float | None = 3.0,
        clip_period: int = 4,
        clip_min_cols: int = 8,
        clip_beta: float = 0.9,
        energy_beta: float = 0.99,
        energy_quantile: float = 0.5,
        energy_eps: float = 1e-12,
        energy_source: str = "momentum",
        warmup_steps: int = 0,
        schedule_free: bool = True,
        sf_mix: float = 0.3,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, nesterov=nesterov,
            ns_coefficients=ns_coefficients, ns_steps=ns_steps, ns_dtype=ns_dtype,
            scale=scale, clip=clip, clip_alpha=clip_alpha, clip_min=clip_min,
            clip_trigger=clip_trigger, clip_period=clip_period, clip_min_cols=clip_min_cols,
            clip_beta=clip_beta, energy_beta=energy_beta, energy_quantile=energy_quantile,
            energy_eps=energy_eps, energy_source=energy_source, warmup_steps=warmup_steps,
            schedule_free=schedule_free, sf_mix=sf_mix,
        )
        super().__init__(params, defaults, **_backend_kwargs(backend, check_finite, diagnostics))


class NorMuon(MatrixOptimizer):
    """NorMuon: TrasMuon's pipeline with the column gate off (row-normalized orthogonal
    momentum with the global RMS step size ``scale * lr``). 2D params take this rule and
    all others AdamW, unless their param group names a ``rule``."""

    matrix_rule = "normuon"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        ns_coefficients: Any = ref.TRASMUON_NS_COEFFICIENTS,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
        scale: float = 0.2,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, nesterov=nesterov,
            ns_coefficients=ns_coefficients, ns_steps=ns_steps, ns_dtype=ns_dtype, scale=scale,
        )
        super().__init__(params, defaults, **_backend_kwargs(backend, check_finite, diagnostics))


class Muon(MatrixOptimizer):
    """Muon with torch.optim.Muon's defaults and update (EMA momentum, Nesterov, Newton-Schulz,
    ``adjust_lr_fn`` shape scaling, decoupled weight decay), on the shared pipeline.

    Unlike torch.optim.Muon it also takes non-2D params, which go to AdamW with betas
    ``(momentum, adamw_beta2)``. A param group may set ``momentum`` (it becomes
    ``betas[0]``). Newton-Schulz normalizes by ``||X||_F + eps`` (docs/rule.md step 3) where
    torch.optim.Muon uses ``max(||X||_F, eps)``; the two agree to bf16 rounding.
    """

    matrix_rule = "muon"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Any = ref.MUON_NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        adamw_beta2: float = 0.95,
        ns_dtype: torch.dtype = torch.bfloat16,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=(momentum, adamw_beta2), eps=eps, weight_decay=weight_decay,
            nesterov=nesterov, ns_coefficients=ns_coefficients, ns_steps=ns_steps,
            ns_dtype=ns_dtype, adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults, **_backend_kwargs(backend, check_finite, diagnostics))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "momentum" in param_group:
            param_group = dict(param_group)
            momentum = param_group.pop("momentum")
            beta2 = param_group.get("betas", self.defaults["betas"])[1]
            param_group["betas"] = (momentum, beta2)
        super().add_param_group(param_group)


class AdamW(MatrixOptimizer):
    """AdamW (decoupled weight decay, bias correction) with torch.optim.AdamW's defaults,
    on the shared pipeline: every param takes the AdamW rule unless its group names
    another. State is float32 for low-precision params."""

    matrix_rule = "adamw"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, **_backend_kwargs(backend, check_finite, diagnostics))

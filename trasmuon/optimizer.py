"""TrasMuon, NorMuon, Muon and AdamW: one ``torch.optim.Optimizer`` over the rule registry.

Every param group names a ``rule`` (a key of :data:`trasmuon.rules.REGISTRY`) or none: a group
that names none sends 2D params to the optimizer's matrix rule and all others to AdamW
(docs/rule.md, "Parameters that are not matrices"). A group holds exactly the hyperparameters
of its rule(s): the rule's defaults, overridden by what the constructor was explicitly given
for keys of that rule, overridden by what the group sets.

A step validates everything first (nothing changes when something is wrong), then runs the
step plan (:mod:`trasmuon.plan`): AdamW buckets, then the matrix pipeline ``prepare``,
``orthogonalize``, ``post``, the all-reduce of sums over rows of sharded matrices, and
``finish``. Collectives between those stages are in :mod:`trasmuon.distributed`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import plan as planning
from . import reference as ref
from .graph import StepCapture
from .plan import (
    BACKENDS,
    ORIENTATIONS,
    Bucket,
    DTensor,
    StepPlan,
    fingerprint,
    init_state,
    oriented,
)
from .rules import MATRIX_RULES, REGISTRY, Hyperparameter, get_rule
from .rules import adamw as adamw_rule
from .rules._checks import in_range, tensor_lr_problem

RULES: tuple[str, ...] = tuple(REGISTRY)
__all__ = ["BACKENDS", "MATRIX_RULES", "ORIENTATIONS", "RULES", "AdamW", "MatrixOptimizer",
           "Muon", "NorMuon", "TrasMuon", "oriented"]

# Keys of a param group that are no rule's hyperparameters: the group's structure, and what
# torch's LR schedulers (OneCycleLR, CyclicLR, SWALR, ...) store in groups.
_STRUCTURE_KEYS = frozenset({"params", "param_names", "rule"})
_SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum",
                             "max_momentum", "swa_lr"})
# torch.optim's implementation switches, which frameworks (torchtitan) put into every group:
# accepted and kept without a warning; the backend option decides how a step runs here.
_FRAMEWORK_KEYS = frozenset({"fused", "foreach"})
_KNOWN_KEYS = frozenset().union(*(r.keys for r in REGISTRY.values()))

# Options given to the constructor (attribute name -> default): load_state_dict, deepcopy
# and pickling keep them.
_OPTION_DEFAULTS: dict[str, Any] = {
    "backend": "auto", "check_finite": False, "diagnostics_enabled": False,
    "check_consistency": True, "cuda_graph": False,
}


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


def _viewable(t: Tensor) -> bool:
    """Whether ``t`` (more than 2D) can be viewed as (t.shape[0], -1) without a copy."""
    try:
        t.view(t.shape[0], -1)
    except RuntimeError:
        return False
    return True


def _simulating() -> bool:
    """Inside ``trasmuon_kernels._launch.simulate_device``: CPU tensors stand for a GPU's (a
    host-time measurement with a stand-in Triton driver)."""
    import sys

    launch = sys.modules.get("trasmuon_kernels._launch")
    return launch is not None and launch.simulated_props() is not None


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class MatrixOptimizer(Optimizer):
    """The shared optimizer of :class:`TrasMuon`, :class:`NorMuon`, :class:`Muon` and
    :class:`AdamW`. Subclasses set ``matrix_rule`` (the rule of 2D params in groups that name
    none), their constructor defaults, and how the AdamW params of such a group derive their
    hyperparameters (``fallback_hyperparameters``, ``fallback_adamw``)."""

    matrix_rule: ClassVar[str] = "trasmuon"
    # Extra keys of a group that names no rule, read only by its AdamW params.
    fallback_hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = ()
    # Distributed subclasses default process_group to the world (DDP work splitting).
    split_by_default: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any) -> MatrixOptimizer:
        self = super().__new__(cls)
        # Which constructor arguments were given explicitly: only those reach param groups
        # of other rules (a Muon group in a TrasMuon optimizer keeps Muon's defaults for
        # what the constructor merely defaulted).
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
            self._explicit = frozenset(bound.arguments) - {"self", "params"}
        except TypeError:  # copy/unpickle: restored by __setstate__
            self._explicit = frozenset()
        return self

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
        process_group: Any = None,
        check_consistency: bool = True,
        cuda_graph: bool = False,
    ) -> None:
        name = type(self).__name__
        if backend not in BACKENDS:
            raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton" and not kernels_available():
            raise RuntimeError(
                f"{name}: backend='triton' needs the Triton kernels: pip install triton (or "
                "pip install '.[triton]' in the repository; triton is not installed or cannot be "
                "imported); or use backend='eager'"
            )
        for option, value in (("check_finite", check_finite), ("diagnostics", diagnostics),
                              ("check_consistency", check_consistency), ("cuda_graph", cuda_graph)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}: {option} must be a bool, got {value!r}")
        lr = defaults.get("lr")
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self.backend = backend
        self.check_finite = check_finite
        self.diagnostics_enabled = diagnostics
        self.check_consistency = check_consistency
        self.cuda_graph = cuda_graph
        self._capture = StepCapture(name)
        from . import distributed as dist_support

        self.process_group = dist_support.resolve_process_group(
            name, process_group, self.split_by_default)
        self.comm_stats = dist_support.CommStats()
        self._plan: StepPlan | None = None
        self._fallback_warned: set[frozenset] = set()
        self._key_warned: set[tuple[int, str]] = set()
        self._bound_lrs: dict[int, Tensor] = {}  # group index -> the lr tensor last checked
        # (plan fingerprint, hash of the groups but for lrs): distributed.hyperparameter_digest
        self._static_digest: tuple[tuple, bytes] | None = None
        super().__init__(params, defaults)
        # torch.optim.Optimizer.__setstate__ adds this key; add it now so that a deepcopy
        # or an unpickled optimizer has the same defaults as the original.
        self.defaults.setdefault("differentiable", False)

    # ----------------------------------------------------------------------------------
    # torch.optim.Optimizer plumbing
    # ----------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        from . import distributed as dist_support

        state = super().__getstate__()
        state.update({key: getattr(self, key) for key in _OPTION_DEFAULTS})
        state["_explicit"] = self._explicit
        # A process group is a handle to this process's communicator: it travels as its
        # name and ranks and is looked up again when loaded.
        state.pop("process_group", None)
        state["_process_group_ref"] = dist_support.group_ref(self.process_group)
        for transient in ("_plan", "comm_stats", "_bound_lrs", "_static_digest", "_capture"):
            state.pop(transient, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from . import distributed as dist_support

        # torch's load_state_dict calls this with only "state" and "param_groups": the
        # options set at construction stay as they are (a resume must not switch
        # check_finite off, the backend back to "auto" or the process group to the world).
        # Unpickling and deepcopy bring them in ``state``; the defaults are for pickles
        # older than an option.
        for key, default in _OPTION_DEFAULTS.items():
            if key not in state:
                state[key] = self.__dict__.get(key, default)
        ref_ = state.pop("_process_group_ref", None)
        if "process_group" in self.__dict__:
            state["process_group"] = self.process_group
        else:
            state["process_group"] = dist_support.resolve_group_ref(ref_, type(self).__name__)
        state.setdefault("_explicit", self.__dict__.get("_explicit", frozenset()))
        state["_plan"] = None
        # A captured graph holds the addresses of the old plan's tensors: captured again.
        old_capture = self.__dict__.get("_capture")
        state["_capture"] = StepCapture(type(self).__name__,
                                        old_capture.graph_factory if old_capture else None)
        state.setdefault("comm_stats", self.__dict__.get("comm_stats", dist_support.CommStats()))
        state.setdefault("_fallback_warned", self.__dict__.get("_fallback_warned", set()))
        state.setdefault("_key_warned", self.__dict__.get("_key_warned", set()))
        state["_bound_lrs"] = {}
        state["_static_digest"] = None
        super().__setstate__(state)

    # ----------------------------------------------------------------------------------
    # Param groups
    # ----------------------------------------------------------------------------------
    def _group_keys(self, rule_name: str | None) -> tuple[str, ...]:
        """The hyperparameters a group of ``rule_name`` holds, in the rule's order."""
        rule = get_rule(rule_name or self.matrix_rule)
        keys = tuple(h.name for h in rule.hyperparameters)
        if rule_name is None:
            keys += tuple(h.name for h in self.fallback_hyperparameters)
        return keys

    def _default_for(self, key: str, rule_name: str | None) -> Any:
        if rule_name is None:  # the class's own defaults (its matrix rule's, as constructed)
            if key in self.defaults:
                return self.defaults[key]
            for hp in (*get_rule(self.matrix_rule).hyperparameters, *self.fallback_hyperparameters):
                if hp.name == key:
                    return hp.default
        if key in self._explicit and key in self.defaults:
            return self.defaults[key]
        return get_rule(rule_name or self.matrix_rule).defaults[key]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = type(self).__name__
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        index = len(self.param_groups)
        rule_name = param_group.get("rule")
        if rule_name is not None and rule_name not in REGISTRY:
            raise ValueError(
                f"{name}: param group {index}: rule must be None or one of {tuple(REGISTRY)}, "
                f"got {rule_name!r}")
        given = set(param_group)
        keys = self._group_keys(rule_name)
        group = dict(param_group)
        params = group.get("params")
        if isinstance(params, Tensor):
            group["params"] = [params]
        elif isinstance(params, set):
            raise TypeError(f"{name}: param group {index}: params must be an ordered collection "
                            "of tensors; a set's order changes between runs")
        elif params is not None:
            group["params"] = list(params)
        self._match_names(index, group)
        self._refuse_duplicates(index, group)
        group.setdefault("rule", None)
        for key in keys:
            if key not in group:
                group[key] = self._default_for(key, rule_name)
        super().add_param_group(group)
        added = self.param_groups[-1]
        # torch filled in every key of self.defaults: keep only this group's own.
        for key in list(added):
            if key not in keys and key not in given and key not in _STRUCTURE_KEYS:
                del added[key]
        try:
            self._check_group(index, added)
            self._check_lr(index, added)
            for pi, p in enumerate(added["params"]):
                rule = get_rule(self.rule_of(added, p))
                self._check_matrix(index, pi, p, rule, added)
                self._check_layout(index, pi, p, rule)
            self._warn_unused_keys(index, added, given)
        except Exception:
            self.param_groups.pop()
            raise
        self._plan = None

    def _check_group(self, index: int, group: dict[str, Any]) -> None:
        where = f"{type(self).__name__}: param group {index}"
        rule_name = group["rule"]
        if rule_name is not None and rule_name not in REGISTRY:
            raise ValueError(f"{where}: rule must be None or one of {tuple(REGISTRY)}, got {rule_name!r}")
        for key in self._group_keys(rule_name):
            if key not in group:
                raise ValueError(f"{where}: the group has no {key!r} (a key its rule reads)")
        get_rule(rule_name or self.matrix_rule).check_group(group, where)
        if rule_name is None:
            for hp in self.fallback_hyperparameters:
                if not hp.check(group[hp.name]):
                    raise ValueError(f"{where}: {hp.name} must be {hp.expected}, got {group[hp.name]!r}")

    def _match_names(self, index: int, group: dict[str, Any]) -> None:
        """torch refuses a mix of groups with and without parameter names; a mix is accepted
        here (e.g. unnamed params added after ``split_params``' named groups): the side
        without names gets ``"param_groups[g][i]"``, the parameter's place."""
        params = group.get("params") or []
        named = any(isinstance(p, tuple) for p in params)
        others = [g for g in self.param_groups if g.get("params")]
        if not others:
            return
        if not named and all("param_names" in g for g in others):
            group["params"] = [(f"param_groups[{index}][{pi}]", p) for pi, p in enumerate(params)]
        elif named and not any("param_names" in g for g in others):
            for gi, g in enumerate(self.param_groups):
                g["param_names"] = [f"param_groups[{gi}][{pi}]" for pi in range(len(g["params"]))]

    def _refuse_duplicates(self, index: int, group: dict[str, Any]) -> None:
        """A parameter listed twice in one group would be updated twice per step (torch
        warns and plans to refuse it): refused, naming it, before the group is added."""
        seen: dict[int, int] = {}
        names = group.get("param_names")
        for pi, p in enumerate(group.get("params", ())):
            first = seen.setdefault(id(p), pi)
            if first != pi:
                what = (f"parameter {names[pi]!r}" if names is not None and pi < len(names)
                        else f"parameter {pi}")
                raise ValueError(
                    f"{type(self).__name__}: param group {index}: {what} is the same tensor as "
                    f"parameter {first} of the group; list each parameter once")

    def _check_lr(self, index: int, group: dict[str, Any]) -> None:
        """A float lr is checked by the rule; a tensor lr's value is read (a host sync on
        CUDA) the first time the optimizer binds that tensor, and again whenever the group's
        lr is replaced by another tensor. A value written into the same tensor in place is
        not checked: a captured step needs exactly that (docs/usage.md)."""
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            if not in_range(0.0, float("inf"))(lr):
                raise ValueError(f"{type(self).__name__}: param group {index}: lr must be a "
                                 f"finite float >= 0 or a one-element tensor, got {lr!r}")
            return
        if self._bound_lrs.get(index) is lr:
            return
        problem = tensor_lr_problem(lr)
        if problem is not None:
            raise ValueError(f"{type(self).__name__}: param group {index}: lr: {problem}")
        self._bound_lrs[index] = lr

    def _warn_unused_keys(self, index: int, group: dict[str, Any], keys: Iterable[str]) -> None:
        """Warn once per (group, key) about keys that no rule of this group reads: they are
        kept and have no effect (a typo such as ``weight_deacy`` would change nothing)."""
        known = (set(self._group_keys(group.get("rule"))) | _STRUCTURE_KEYS | _SCHEDULER_KEYS
                 | _FRAMEWORK_KEYS)
        if group.get("rule") is None:
            known |= adamw_rule.ADAMW.keys
        for key in sorted(set(keys) - known):
            if (index, key) in self._key_warned:
                continue
            self._key_warned.add((index, key))
            rule = group.get("rule")
            rules = (f"rule {rule!r}" if rule else
                     f"rules {self.matrix_rule!r} (2D params) and 'adamw' (the others)")
            hint = "" if key in _KNOWN_KEYS else " (no rule of this optimizer knows it)"
            warnings.warn(
                f"{type(self).__name__}: param group {index} sets {key!r}, which its "
                f"{rules} do not read{hint}; the value is kept but has no effect",
                stacklevel=4,
            )

    def rule_of(self, group: dict[str, Any], param: Tensor) -> str:
        """The name of the rule that updates ``param`` in ``group``: a group that names none
        sends 2D params (and, with ``flatten=True``, params of more dims) to the matrix rule."""
        if group.get("rule") is not None:
            return group["rule"]
        matrix = (param.ndim == 2 or (param.ndim > 2 and group.get("flatten") is True)
                  or (param.ndim == 3 and group.get("stacked") is True))
        return self.matrix_rule if matrix else adamw_rule.ADAMW.name

    def _check_matrix(self, gi: int, pi: int, p: Tensor, rule: Any, group: dict[str, Any]) -> None:
        """A matrix rule's parameter is 2D, or (out, in, *kernel) with ``flatten=True`` and
        viewable as (out, in * prod(kernel)) (not ``orientation="in_out"``)."""
        if not rule.matrix or (p.ndim == 2 and not group.get("stacked")):
            return
        name, label = type(self).__name__, self._label(gi, pi)
        if group.get("stacked"):
            if p.ndim != 3 or group.get("flatten"):
                raise ValueError(
                    f"{name}: {label} has shape {tuple(p.shape)}; stacked=True takes (E, out, in) "
                    "(or (E, in, out) with orientation='in_out') expert stacks, without flatten=True")
            return  # (its placements are check_layout's to judge)
        if p.ndim < 2 or not group.get("flatten"):
            raise ValueError(
                f"{name}: {label} has shape {tuple(p.shape)}, but rule {rule.name!r} needs a 2D "
                "parameter (or flatten=True in its group, for an (out, in, *kernel) weight, or "
                "stacked=True, for an (E, out, in) expert stack)")
        if group.get("orientation", "out_in") == "in_out":
            raise ValueError(f"{name}: {label}: flatten=True takes (out, in, *kernel) weights; "
                             "it cannot be combined with orientation='in_out'")
        lp = planning.local(p)
        if not _viewable(lp):
            raise ValueError(
                f"{name}: {label} has strides {lp.stride()}, which cannot be viewed as an "
                f"({p.shape[0]}, {math.prod(p.shape[1:])}) matrix; flatten=True needs the dims "
                "after the first to be contiguous (not channels_last)")

    def fallback_adamw(self, group: dict[str, Any]) -> dict[str, Any]:
        """The AdamW hyperparameters of the non-matrix params of a group that names no rule:
        the group's lr, betas, eps and weight decay (docs/rule.md)."""
        return {k: group[k] for k in adamw_rule.KEYS}

    def _check_layout(self, gi: int, pi: int, p: Tensor, rule: Any) -> None:
        from . import distributed as dist_support

        dist_support.check_layout(self, gi, pi, p, rule)

    def _label(self, group_index: int, param_index: int) -> str:
        group = self.param_groups[group_index]
        names = group.get("param_names")
        if names is not None:
            return f"parameter {names[param_index]!r} (group {group_index})"
        return f"parameter {param_index} of param group {group_index}"

    # ----------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping each state tensor's saved dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's
        dtype; for a bf16 parameter that would turn the float32 momentum into bf16. The
        pre-hooks and post-hooks run here around the base implementation so that post-hooks
        see the restored state. State tensors that do not fit their parameters are refused
        before anything is loaded.
        """
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        for hook in pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) == len(saved_groups) and all(
            len(g["params"]) == len(sg["params"]) for g, sg in zip(groups, saved_groups, strict=True)
        ):  # otherwise torch's own check below raises its error
            from . import distributed as dist_support

            error = None
            try:
                self._check_loaded_state(state_dict)
            except (ValueError, TypeError, RuntimeError) as exc:
                error = exc
            # Each rank checks its own shards: under torch.distributed every rank raises
            # the same error (or none), so that no rank goes on to a step the others left.
            dist_support.agree_on_error(self, error)
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
            # State is float32 (float64 for float64 params) on both backends: a checkpoint
            # holding another float dtype is cast to it, as torch casts to the param dtype.
            sdt = ref.state_dtype(param.dtype)
            for key, value in saved.items():
                if key == "step":  # a host float32 counter (older checkpoints: a number)
                    device = value.device if isinstance(value, Tensor) else None
                    self.state[param][key] = torch.as_tensor(
                        float(value), dtype=torch.float32, device=device)
                elif isinstance(value, Tensor):
                    dtype = sdt if value.is_floating_point() else value.dtype
                    self.state[param][key] = value.detach().to(
                        device=param.device, dtype=dtype, copy=True)
        for group in self.param_groups:  # checkpoints from before a key existed
            rule_name = group.setdefault("rule", None)
            self._upgrade_group(group)
            for key in self._group_keys(rule_name):
                group.setdefault(key, self._default_for(key, rule_name))
        self._plan = None
        for hook in post_hooks.values():
            hook(self)

    def _upgrade_group(self, group: dict[str, Any]) -> None:
        """Keys of a loaded group that older versions stored otherwise (the rule knows)."""
        get_rule(group["rule"] or self.matrix_rule).upgrade_group(group)

    def _check_loaded_state(self, state_dict: dict[str, Any]) -> None:
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
            rule_name = self.rule_of(saved_group, param)
            if rule_name not in REGISTRY:
                raise ValueError(f"{name}: load_state_dict: param group {gi} has rule "
                                 f"{rule_name!r}, which is not registered")
            rule = get_rule(rule_name)
            group = {**rule.defaults, **{k: v for k, v in saved_group.items() if k in rule.keys}}
            expected = planning.state_shapes(rule, group, tuple(param.shape))
            entries = {e.name: e for e in planning.state_entries_for(rule, group, tuple(param.shape))}
            for key, value in saved.items():
                if key not in expected:
                    if key in _ALL_STATE_KEYS:  # state of another rule or setting: not read
                        continue
                    raise ValueError(
                        f"{name}: load_state_dict: state {key!r} of {self._label(gi, pi)} is not "
                        f"a state of rule {rule_name!r}; nothing was loaded")
                where_ = f"{name}: load_state_dict: state {key!r} of {self._label(gi, pi)}"
                if key == "step":
                    _check_loaded_step(where_, value)
                    continue
                if not isinstance(value, Tensor):
                    raise ValueError(f"{where_} is a {type(value).__name__}, not a tensor; "
                                     "nothing was loaded")
                if not value.is_floating_point():
                    raise ValueError(f"{where_} has dtype {value.dtype}; optimizer state is "
                                     "floating point; nothing was loaded")
                values = planning.local(value).detach()
                if not bool(torch.isfinite(values).all()):
                    raise ValueError(f"{where_} holds NaN or Inf; a step from it would carry "
                                     "them into the weights; nothing was loaded")
                entry = entries.get(key)
                if entry is not None and entry.nonnegative and bool((values < 0).any()):
                    raise ValueError(f"{where_} holds negative values, but it is a mean of "
                                     "squares; nothing was loaded")
                want = expected[key]
                ok = tuple(value.shape) == want
                if not ok:
                    raise ValueError(
                        f"{name}: load_state_dict: state {key!r} of {self._label(gi, pi)} "
                        f"has shape {tuple(value.shape)}, but the parameter has shape "
                        f"{tuple(param.shape)} and rule {rule_name!r} keeps {key!r} as "
                        f"{want if want else 'a scalar'}; nothing was loaded"
                    )

    # ----------------------------------------------------------------------------------
    # Checks before a step
    # ----------------------------------------------------------------------------------
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

    # ----------------------------------------------------------------------------------
    # The plan
    # ----------------------------------------------------------------------------------
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
        for gi, pi, p, grad, rule_name in work:
            group = self.param_groups[gi]
            rule = get_rule(rule_name)
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
                    bucket.params.append(p)
                    bucket.experts.append(e)
                    bucket.labels.append(f"{self._label(gi, pi)} expert {first + e}")
                    bucket.states.append(planning.ExpertState(self.state[p], e, count, fresh))
                continue
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

    # ----------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------
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

    # ----------------------------------------------------------------------------------
    # Diagnostics
    # ----------------------------------------------------------------------------------
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


def _check_loaded_step(where: str, value: Any) -> None:
    """A step counter: one finite, whole, non-negative number (a tensor or a plain number)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{where} must be one real number, got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}; nothing was loaded")
        number = float(planning.local(value).detach().reshape(()).cpu())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"{where} must be a number, got {value!r}; nothing was loaded")
    if not (math.isfinite(number) and number >= 0 and number == int(number)):
        raise ValueError(f"{where} must be a finite whole number >= 0, got {number}; "
                         "nothing was loaded")


def _describe(t: Tensor) -> str:
    kind = "DTensor" if isinstance(t, DTensor) else "tensor"
    return f"{t.dtype} {kind} of shape {tuple(t.shape)} on {t.device}"


# Every state key any rule keeps: a loaded entry of another rule is left alone, not refused.
_ALL_STATE_KEYS = frozenset({"step"}).union(*(rule.state_names for rule in REGISTRY.values()))


def option_kwargs(backend: str, check_finite: bool, diagnostics: bool, process_group: Any,
                   check_consistency: bool, cuda_graph: bool = False) -> dict[str, Any]:
    return {"backend": backend, "check_finite": check_finite, "diagnostics": diagnostics,
            "process_group": process_group, "check_consistency": check_consistency,
            "cuda_graph": cuda_graph}


class TrasMuon(MatrixOptimizer):
    """TrasMuon (arXiv 2602.13498): NorMuon-style orthogonalized momentum with a global
    RMS-calibrated step size and an energy-based column gate that damps bursty columns.

    2D params take the TrasMuon rule and all others AdamW (with the group's lr, betas, eps,
    weight_decay), unless their param group names a ``rule``. Arguments and defaults follow
    docs/rule.md, which maps each one to the paper's equation and to the code; the options
    after ``sf_mix`` are in docs/usage.md.
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
        process_group: Any = None,
        check_consistency: bool = True,
        cuda_graph: bool = False,
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
        super().__init__(params, defaults, **option_kwargs(
            backend, check_finite, diagnostics, process_group, check_consistency, cuda_graph))


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
        process_group: Any = None,
        check_consistency: bool = True,
        cuda_graph: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, nesterov=nesterov,
            ns_coefficients=ns_coefficients, ns_steps=ns_steps, ns_dtype=ns_dtype, scale=scale,
        )
        super().__init__(params, defaults, **option_kwargs(
            backend, check_finite, diagnostics, process_group, check_consistency, cuda_graph))


_ADAMW_BETA2 = Hyperparameter("adamw_beta2", 0.95, in_range(0.0, 1.0, hi_open=True),
                              "a float in [0, 1)")


class Muon(MatrixOptimizer):
    """Muon with torch.optim.Muon's defaults and update (EMA momentum, Nesterov, Newton-Schulz,
    ``adjust_lr_fn`` shape scaling, decoupled weight decay), on the shared pipeline.

    Unlike torch.optim.Muon it also takes non-2D params, which go to AdamW with betas
    ``(momentum, adamw_beta2)`` (and the group's lr, eps and weight decay). Newton-Schulz
    normalizes by ``||X||_F + eps`` (docs/rule.md step 3) where torch.optim.Muon uses
    ``max(||X||_F, eps)``; the two agree to bf16 rounding.
    """

    matrix_rule = "muon"
    fallback_hyperparameters = (_ADAMW_BETA2,)

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
        process_group: Any = None,
        check_consistency: bool = True,
        cuda_graph: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, adamw_beta2=adamw_beta2,
        )
        super().__init__(params, defaults, **option_kwargs(
            backend, check_finite, diagnostics, process_group, check_consistency, cuda_graph))

    def _upgrade_group(self, group: dict[str, Any]) -> None:
        # Muon groups once held betas = (momentum, adamw_beta2).
        if group["rule"] is None and "adamw_beta2" not in group and "betas" in group:
            group["adamw_beta2"] = group["betas"][1]
        super()._upgrade_group(group)

    def fallback_adamw(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"lr": group["lr"], "betas": (group["momentum"], group["adamw_beta2"]),
                "eps": group["eps"], "weight_decay": group["weight_decay"]}


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
        process_group: Any = None,
        check_consistency: bool = True,
        cuda_graph: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, **option_kwargs(
            backend, check_finite, diagnostics, process_group, check_consistency, cuda_graph))


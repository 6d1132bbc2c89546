"""``MatrixOptimizer``: one ``torch.optim.Optimizer`` over the rule registry, which the classes
of :mod:`trasmuon.classes` (TrasMuon, NorMuon, Muon, NAMO, NAMO-D, AdamW) specialize.

Every param group names a ``rule`` (a key of :data:`trasmuon.rules.REGISTRY`) or none: a group
that names none sends 2D params to the optimizer's matrix rule and all others to AdamW
(docs/rule.md, "Parameters that are not matrices"). A group holds exactly the hyperparameters
of its rule(s): the rule's defaults, overridden by what the constructor was explicitly given
for keys of that rule, overridden by what the group sets.

A step validates everything first (nothing changes when something is wrong), then runs the
step plan (:mod:`trasmuon.plan`): AdamW buckets, then the matrix pipeline ``prepare``,
``orthogonalize``, ``post``, the all-reduce of sums over rows of sharded matrices, and
``finish``. Collectives between those stages are in :mod:`trasmuon.distributed`.

The class is assembled from one mixin per concern: :mod:`trasmuon.groups` (param groups and
their checks), :mod:`trasmuon.checkpoint` (``load_state_dict``), :mod:`trasmuon.stepping` (the
step, the plan, diagnostics); this module holds construction, pickling and the constructor
helper of the classes.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from .checkpoint import Checkpoints
from .graph import StepCapture
from .groups import ParamGroups
from .plan import (
    BACKENDS,
    ORIENTATIONS,
    StepPlan,
    oriented,
)
from .rules import MATRIX_RULES, REGISTRY, Hyperparameter
from .rules import adamw as adamw_rule
from .stepping import StepDriver, kernels_available

RULES: tuple[str, ...] = tuple(REGISTRY)
__all__ = ["BACKENDS", "MATRIX_RULES", "OPTIONS", "ORIENTATIONS", "RULES", "MatrixOptimizer",
           "constructor_arguments", "kernels_available", "oriented"]

# The constructor's options (not hyperparameters: no param group holds them).
OPTIONS = ("backend", "check_finite", "diagnostics", "process_group", "check_consistency",
           "cuda_graph")


def constructor_arguments(arguments: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(params, defaults, options)`` from a class constructor's ``locals()``: every argument
    but ``params`` and the ``OPTIONS`` is a hyperparameter default, named as in its rule's
    table (tests/test_classes.py checks each signature against the tables)."""
    given = {k: v for k, v in arguments.items() if k not in ("self", "__class__")}
    params = given.pop("params")
    options = {k: given.pop(k) for k in OPTIONS}
    return params, given, options


# Options given to the constructor (attribute name -> default): load_state_dict, deepcopy
# and pickling keep them.
_OPTION_DEFAULTS: dict[str, Any] = {
    "backend": "auto", "check_finite": False, "diagnostics_enabled": False,
    "check_consistency": True, "cuda_graph": False,
}


class MatrixOptimizer(ParamGroups, Checkpoints, StepDriver, Optimizer):
    """The shared optimizer of the classes of :mod:`trasmuon.classes`. Subclasses set
    ``matrix_rule`` (the rule of 2D params in groups that name none), their constructor
    defaults, and how the AdamW params of such a group derive their hyperparameters
    (``fallback_hyperparameters``, ``fallback_adamw``)."""

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
        # The stochastic rounding seed of groups that store bf16 momentum and set no seed
        # (docs/usage.md, "state_dtype"): torch's initial seed, read once, now.
        self._initial_seed = torch.initial_seed()
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
        state["_initial_seed"] = self._initial_seed
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
        state.setdefault("_initial_seed", self.__dict__.get("_initial_seed", 0))
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
    # What a parameter takes
    # ----------------------------------------------------------------------------------
    def rule_of(self, group: dict[str, Any], param: Tensor) -> str:
        """The name of the rule that updates ``param`` in ``group``: a group that names none
        sends 2D params (and, with ``flatten=True``, params of more dims) to the matrix rule."""
        if group.get("rule") is not None:
            return group["rule"]
        matrix = (param.ndim == 2 or (param.ndim > 2 and group.get("flatten") is True)
                  or (param.ndim == 3 and group.get("stacked") is True))
        return self.matrix_rule if matrix else adamw_rule.ADAMW.name

    def fallback_adamw(self, group: dict[str, Any]) -> dict[str, Any]:
        """The AdamW hyperparameters of the non-matrix params of a group that names no rule:
        the group's lr, betas, eps and weight decay (docs/rule.md)."""
        return {k: group[k] for k in adamw_rule.KEYS}

    def _label(self, group_index: int, param_index: int) -> str:
        group = self.param_groups[group_index]
        names = group.get("param_names")
        if names is not None:
            return f"parameter {names[param_index]!r} (group {group_index})"
        return f"parameter {param_index} of param group {group_index}"

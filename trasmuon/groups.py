"""Param groups of :class:`trasmuon.optimizer.MatrixOptimizer`: their keys and defaults from the
rule registry, the checks a group and its parameters pass before anything changes, names,
unused keys (docs/usage.md, "Classes")."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import plan as planning
from . import reference as ref
from .rules import REGISTRY, get_rule
from .rules import adamw as adamw_rule
from .rules._checks import in_range, tensor_lr_problem

# Keys of a param group that are no rule's hyperparameters: the group's structure, and what
# torch's LR schedulers (OneCycleLR, CyclicLR, SWALR, ...) store in groups.
_STRUCTURE_KEYS = frozenset({"params", "param_names", "rule"})

_SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum",
                             "max_momentum", "swa_lr"})

# torch.optim's implementation switches, which frameworks (torchtitan) put into every group:
# accepted and kept without a warning; the backend option decides how a step runs here.
_FRAMEWORK_KEYS = frozenset({"fused", "foreach"})

_KNOWN_KEYS = frozenset().union(*(r.keys for r in REGISTRY.values()))

def _viewable(t: Tensor) -> bool:
    """Whether ``t`` (more than 2D) can be viewed as (t.shape[0], -1) without a copy."""
    try:
        t.view(t.shape[0], -1)
    except RuntimeError:
        return False
    return True


class ParamGroups:
    """The param-group half of ``MatrixOptimizer`` (a mixin: its state is the optimizer's)."""

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
                self._check_shape(index, pi, p, rule, added)
                self._check_state_dtype(index, pi, p, rule, added)
                self._check_layout(index, pi, p, rule)
            self._warn_unused_keys(index, added, given)
            self._resolve_seed(added)
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
        # named: (name, param) pairs, or a "param_names" list beside them (torchtitan's groups)
        named = "param_names" in group or any(isinstance(p, tuple) for p in params)
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

    def _check_shape(self, gi: int, pi: int, p: Tensor, rule: Any, group: dict[str, Any]) -> None:
        """A matrix rule's constraints on the (out, in) shape (``MatrixRule.shape_problem``:
        ``ns_blocks`` must divide it), after ``_check_matrix``."""
        if not rule.matrix:
            return
        shape = planning.matrix_shape(tuple(p.shape), group.get("orientation", "out_in"),
                                      bool(group.get("flatten")), bool(group.get("stacked")))
        problem = rule.shape_problem(group, shape)
        if problem is not None:
            raise ValueError(f"{type(self).__name__}: {self._label(gi, pi)}: {problem}")

    def _check_state_dtype(self, gi: int, pi: int, p: Tensor, rule: Any, group: dict[str, Any]) -> None:
        """A group's ``state_dtype`` (float32 or bf16) needs fp32, bf16 or fp16 parameters:
        float64 parameters keep float64 state (``state_dtype=None``)."""
        sdt = group.get("state_dtype") if rule.matrix else None
        if sdt is None or p.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return
        raise ValueError(
            f"{type(self).__name__}: {self._label(gi, pi)} has dtype {p.dtype}, but its group "
            f"sets state_dtype={sdt}: a {p.dtype} parameter keeps its state in "
            f"{ref.state_dtype(p.dtype)} (state_dtype=None); put it in a group of its own")

    def _resolve_seed(self, group: dict[str, Any]) -> None:
        """A group that stores bf16 momentum and sets no ``seed`` takes the optimizer's
        (``torch.initial_seed()`` at construction), written into the group: the state dict
        keeps it, so a resumed run rounds with the same bits."""
        if group.get("state_dtype") == torch.bfloat16 and group.get("seed", 0) is None:
            group["seed"] = self._initial_seed

    def _check_layout(self, gi: int, pi: int, p: Tensor, rule: Any) -> None:
        from . import distributed as dist_support

        dist_support.check_layout(self, gi, pi, p, rule)

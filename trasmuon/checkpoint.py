"""Checkpoints of :class:`trasmuon.optimizer.MatrixOptimizer`: ``load_state_dict`` checks every
loaded group and state tensor against the rules before anything changes, upgrades older
groups and converts the momentum's storage dtype (docs/usage.md)."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from . import plan as planning
from . import reference as ref
from .rules import REGISTRY, get_rule

# Every state key any rule keeps: a loaded entry of another rule is left alone, not refused.
_ALL_STATE_KEYS = frozenset({"step"}).union(*(rule.state_names for rule in REGISTRY.values()))

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


class Checkpoints:
    """The checkpoint half of ``MatrixOptimizer`` (a mixin: its state is the optimizer's)."""

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
        # state_dtype belongs to the optimizer as constructed (its memory budget), like
        # backend: the loaded momentum is converted to it (docs/usage.md, "state_dtype").
        # A checkpoint without a seed (float32 state) keeps the group's own.
        kept = [("state_dtype" in g, g.get("state_dtype"), g.get("seed")) for g in self.param_groups]
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        for group, (has, sdt, seed) in zip(self.param_groups, kept, strict=True):
            rule_name = group.setdefault("rule", None)
            self._upgrade_group(group)
            for key in self._group_keys(rule_name):  # checkpoints from before a key existed
                group.setdefault(key, self._default_for(key, rule_name))
            if has and "state_dtype" in group:
                group["state_dtype"] = sdt
                if group.get("seed") is None:
                    group["seed"] = seed
            self._resolve_seed(group)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [(g, p) for g in self.param_groups for p in g["params"]]
        id_to_param = dict(zip(saved_ids, params, strict=True))
        for pid, saved in state_dict["state"].items():
            group, param = id_to_param[pid]
            # State is float32 (float64 for float64 params) on both backends: a checkpoint
            # holding another float dtype is cast to it, as torch casts to the param dtype;
            # a matrix rule's momentum goes to the group's state_dtype (bf16 by rounding to
            # nearest, float32 exactly: reference.convert_state).
            sdt = ref.state_dtype(param.dtype)
            rule = get_rule(self.rule_of(group, param))
            compact = {e.name: planning.entry_dtype(e, group, param.dtype)
                       for e in planning.state_entries_for(rule, group, tuple(param.shape)) if e.compact}
            for key, value in saved.items():
                if key == "step":  # a host float32 counter (older checkpoints: a number)
                    device = value.device if isinstance(value, Tensor) else None
                    self.state[param][key] = torch.as_tensor(
                        float(value), dtype=torch.float32, device=device)
                elif isinstance(value, Tensor) and key in compact and value.is_floating_point():
                    self.state[param][key] = ref.convert_state(value.to(param.device), compact[key])
                elif isinstance(value, Tensor):
                    dtype = sdt if value.is_floating_point() else value.dtype
                    self.state[param][key] = value.detach().to(
                        device=param.device, dtype=dtype, copy=True)
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

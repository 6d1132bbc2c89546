"""Update rules as objects, and the registry from rule names to rules.

A rule declares

* its hyperparameters (:class:`Hyperparameter`: name, default, check), which are exactly the
  keys a param group of that rule holds;
* its state (:class:`StateEntry`: name, extent, fill value), from which the optimizer creates
  missing state and checks loaded state;
* its stages, for each backend: :meth:`Rule.program` returns the object that runs one bucket
  of same-shape parameters through the rule, built once per step plan (see
  :mod:`trasmuon.plan`). The eager program is the reference and runs anywhere; the Triton
  program issues prepared kernel launches with the same semantics.

Matrix rules share one pipeline (:class:`MatrixRule`): ``prepare`` (the momentum pass: the
Newton–Schulz input and sums over rows), ``orthogonalize`` (done by the plan, or by the
distributed exchange around it), ``post`` (what needs O locally), an all-reduce of the
step's sums over rows when matrices are sharded, and ``finish`` (the weight update).

Adding a rule is one module in this package that defines a :class:`Rule` subclass and calls
:func:`register` (modules are discovered on import).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ._checks import Check

if TYPE_CHECKING:
    from ..plan import Bucket, StepPlan

__all__ = [
    "MATRIX_RULES",
    "REGISTRY",
    "Hyperparameter",
    "MatrixRule",
    "Program",
    "Rule",
    "StateEntry",
    "get_rule",
    "register",
]


@dataclass(frozen=True)
class Hyperparameter:
    """One key of a param group: its default, a check, and what a valid value is (for the
    error message). ``per_group``: a property of a group's parameters (their layout, their
    blocks), set in the group only; every other hyperparameter is also a keyword argument of
    the optimizer classes whose rule has it (tests/test_classes.py)."""

    name: str
    default: Any
    check: Check
    expected: str
    per_group: bool = False


@dataclass(frozen=True)
class StateEntry:
    """One state tensor of a parameter. ``extent``: ``"param"`` (one entry per element,
    stored like the parameter), ``"rows"`` (d_out entries of the (out, in) matrix),
    ``"cols"`` (d_in entries) or ``"scalar"``. ``lazy`` entries are created by the rule's own
    first use (e.g. ``energy_ref`` at the first gated step), not with the rest.
    ``nonnegative``: a mean of squares, which a loaded checkpoint may not make negative.
    ``compact``: stored in the group's ``state_dtype`` when it sets one (a matrix rule's
    momentum, bf16 with stochastic rounding); every other entry keeps the float32 state dtype
    (``reference.state_dtype``)."""

    name: str
    extent: str
    fill: float = 0.0
    lazy: bool = False
    nonnegative: bool = False
    compact: bool = False


class Program:
    """A bucket's work for one backend, built once per plan. Matrix programs implement
    ``prepare``, ``post`` and ``finish``; the AdamW program implements ``run``. ``collect``
    asks a program to keep what ``diagnostics`` reads."""

    collect: bool = False

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per parameter, the observables of the last step as device tensors."""
        return []


class Rule:
    """An update rule. Subclasses set ``name``, ``hyperparameters`` and implement
    ``state_entries`` and ``program``."""

    name: ClassVar[str]
    matrix: ClassVar[bool] = False  # needs 2D parameters
    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = ()
    # Every state name ``state_entries`` can return, under any setting: a loaded state entry
    # of another rule is left alone rather than refused (``MatrixOptimizer.load_state_dict``).
    state_names: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        self.keys: frozenset[str] = frozenset(h.name for h in self.hyperparameters)
        self.defaults: dict[str, Any] = {h.name: h.default for h in self.hyperparameters}
        self._by_name: dict[str, Hyperparameter] = {h.name: h for h in self.hyperparameters}

    def __repr__(self) -> str:
        return f"<rule {self.name!r}>"

    def check_group(self, group: Mapping[str, Any], where: str) -> None:
        """Raise a ValueError naming ``where`` and the key for the first invalid value."""
        for key in sorted(self.keys):
            hp = self._by_name[key]
            value = group[key]
            if not hp.check(value):
                raise ValueError(f"{where}: {key} must be {hp.expected}, got {value!r}")

    def upgrade_group(self, group: dict[str, Any]) -> None:
        """Rewrite, in place, keys of a loaded param group that older versions stored
        otherwise (before the defaults of missing keys are filled in)."""

    def state_entries(self, group: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[StateEntry, ...]:
        """The state of a parameter of (oriented) ``shape`` in ``group``."""
        raise NotImplementedError

    def program(self, bucket: Bucket, backend: str, plan: StepPlan) -> Program:
        """The object that runs ``bucket`` on ``backend`` ("eager" or "triton") within
        ``plan`` (whose device scalars a Triton program reserves)."""
        raise NotImplementedError

    def unsupported_by_triton(self, group: Mapping[str, Any], param: Any, grad: Any) -> str | None:
        """Why the Triton program cannot take this parameter (None when it can)."""
        return None


class MatrixRule(Rule):
    """A rule for 2D parameters on the shared matrix pipeline."""

    matrix = True
    # Whether ``post`` needs O's row sums of squares (the Triton orthogonalize stage then
    # reduces them in Newton–Schulz's last epilogue).
    needs_row_sumsq: ClassVar[bool] = False

    def ns_schedule(self, group: Mapping[str, Any]) -> tuple[tuple[float, float, float], ...]:
        from .. import reference as ref

        return ref.ns_schedule(group["ns_coefficients"], group["ns_steps"])

    def ns_eps(self, group: Mapping[str, Any]) -> float:
        """What Newton–Schulz adds to ||X||_F before dividing (the group's ``eps`` unless the
        rule fixes it)."""
        return float(group["eps"])

    def shape_problem(self, group: Mapping[str, Any], shape: tuple[int, int]) -> str | None:
        """What is wrong with a (d_out, d_in) matrix (oriented; an expert's for a stack) in
        ``group`` (None when nothing is): the group's ``ns_blocks`` must divide it. The
        optimizer raises it, naming the parameter, when the group is added and before a step
        plans anew."""
        from .. import reference as ref

        return ref.ns_blocks_problem(group.get("ns_blocks", ref.DEFAULT_NS_BLOCKS), shape)

    def reductions(self, group: Mapping[str, Any], shape: tuple[int, int]) -> dict[str, int]:
        """Per matrix, the sums over rows the rule needs (name -> length). Length d_in: a
        sum per column, over the rows (a rank holding a block writes its columns' partial
        sums); length 1: the sum over rows of a quantity of whole rows (a block's rank adds
        it only if the block holds its rows' first columns). A sharded matrix's sums are
        all-reduced by the plan, once per step for all matrices."""
        return {}


REGISTRY: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Add ``rule`` to the registry under its name (the value of a param group's ``rule``)."""
    if rule.name in REGISTRY:
        raise ValueError(f"a rule named {rule.name!r} is already registered")
    REGISTRY[rule.name] = rule
    return rule


def get_rule(name: str) -> Rule:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; registered rules: {tuple(REGISTRY)}") from None


def _discover() -> None:
    """Import every public module of this package: each one registers its rule(s), so a new
    rule is a new module here and nothing else."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()
MATRIX_RULES: tuple[str, ...] = tuple(name for name, r in REGISTRY.items() if r.matrix)

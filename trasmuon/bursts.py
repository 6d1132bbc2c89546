"""Column bursts: seeded, logged perturbations of gradient or momentum columns.

The paper's stress tests (Appendix E.5, and the controlled diagnostic of Appendix G) inject
*column bursts*: every ``every`` steps, a few input-feature columns of a weight matrix get a
much larger gradient or momentum than the others, the event TrasMuon's column gate is built
to damp. :class:`ColumnBurst` does this to any ``torch.optim`` optimizer without modifying it:
it is a step pre-hook (``optimizer.register_step_pre_hook``) that edits ``p.grad`` (and, for a
momentum burst, the optimizer's first-moment state) just before each step, and it records
every burst so that plots and ``optimizer.diagnostics()`` line up with it.

Modes (``mode``), for a burst of scale ``s`` on the column set ``J`` of a matrix ``W``:

- ``"grad"``: ``G[:, J] <- s * G[:, J]`` (a multiplicative gradient burst);
- ``"grad_add"``: ``G[:, J] <- G[:, J] + s * rms(G) * Z`` with ``Z`` standard normal (seeded)
  and ``rms(G)`` the root mean square of the whole gradient before the burst (an additive
  burst of ``s`` times the gradient's typical entry);
- ``"momentum"``: the momentum after the step's EMA update is ``s`` times what it would
  have been on the columns ``J``: ``M_t[:, J] = s * (b1 * M_{t-1}[:, J] + (1 - b1) * G[:, J])``.
  The hook scales both the stored momentum and the gradient by ``s`` on ``J`` before the
  step; since the EMA is linear this is exact (also with Nesterov, whose input
  ``(1 - b1) G + b1 M_t`` is then scaled by ``s`` on ``J`` as well). At a parameter's first
  step the momentum does not exist yet (optimizers create it lazily) and is zero, so scaling
  the gradient alone gives the same result. The state keys scaled are ``"momentum"``
  (trasmuon's matrix rules), ``"exp_avg"`` (AdamW's first moment; its second moment then
  sees ``s^2 G^2``) and ``"momentum_buffer"`` (torch.optim.SGD and torch.optim.Muon).
  Afterwards the burst decays with the momentum (by ``b1`` per step).

Bases (``basis``): ``"columns"`` bursts coordinate columns (input features), the basis the
column gate measures energy in. ``"random"`` bursts ``k`` random orthonormal directions
``Q`` (``d_in x k``) instead: ``X <- X + (s - 1) (X Q) Q^T`` (the same identity holds, the
burst being a right multiplication by ``P = I + (s - 1) Q Q^T``); its energy spreads over
all coordinate columns. With ``redraw=False`` the column set (or basis) is drawn once per
parameter at its first burst and reused; with ``redraw=True`` it is drawn anew at each
burst. The diagnostic's ``fix_V=True`` is ``basis="columns", redraw=False`` and its
``fix_V=False`` is ``basis="random", redraw=True`` (see docs/experiments.md).

Which parameters: ``params`` names them (any 2D parameters of the optimizer, whatever rule
updates them, e.g. the same hidden matrices under every compared optimizer). By default:
every 2D parameter that the optimizer updates with a matrix rule (TrasMuon, NorMuon, Muon;
for an optimizer that is not a :class:`trasmuon.MatrixOptimizer`, every 2D parameter).
Parameters that are not matrices are left alone unless ``include_non_matrix=True``, which
allows them in ``params`` and, by default, bursts every parameter of the optimizer: a
non-2D tensor is viewed as a matrix ``(shape[0], -1)`` (a 1D tensor as one row, so its
"columns" are its entries).

Step numbering: the step ``t`` of a burst is the 1-based index of the ``optimizer.step()``
call it precedes, the same ``t`` as the optimizer's ``state["step"]`` after that call and as
the observables that ``optimizer.diagnostics()`` returns right after it. Counting starts from
the largest ``state["step"]`` found in the optimizer when the injector is attached, so an
injector attached to a resumed optimizer keeps its numbering. Bursts fire at
``t = start, start + every, start + 2 * every, ...`` up to ``stop``.

Example::

    opt = trasmuon.TrasMuon(trasmuon.split_params(model), lr=3e-3, diagnostics=True)
    bursts = ColumnBurst(opt, every=50, scale=30.0, frac=0.05, mode="momentum", seed=0)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()
        for event in bursts.events_at(bursts.step):   # the bursts of the step just taken
            print(event.step, event.param, event.columns, opt.diagnostics()[event.param])
    bursts.remove()

Closures: ``optimizer.step(closure)`` computes the gradient after the pre-hooks run, so a
burst would miss it; the hook raises a ``RuntimeError`` when a step is called with a closure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

MODES = ("momentum", "grad", "grad_add")
BASES = ("columns", "random")
# First-moment state keys that a momentum burst scales (trasmuon matrix rules, AdamW, SGD
# and torch.optim.Muon).
MOMENTUM_KEYS = ("momentum", "exp_avg", "momentum_buffer")

__all__ = ["BASES", "MODES", "MOMENTUM_KEYS", "BurstEvent", "ColumnBurst", "burst_matrix_"]


@dataclass(frozen=True)
class BurstEvent:
    """One burst of one parameter.

    ``step``: the optimizer step t it fed (1-based). ``param``: the parameter's name (from
    the param group's ``param_names``) or ``"group{g}.param{i}"``. ``columns``: the burst
    column indices with ``basis="columns"``, or ``()`` with ``basis="random"``, whose
    directions are in ``directions`` (``d_in x k``, float32, CPU). ``shape``: the parameter
    viewed as a matrix (d_out, d_in).
    """

    step: int
    param: str
    columns: tuple[int, ...]
    scale: float
    mode: str
    basis: str
    shape: tuple[int, int]
    directions: Tensor | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (without ``directions``)."""
        return {
            "step": self.step, "param": self.param, "columns": list(self.columns),
            "scale": self.scale, "mode": self.mode, "basis": self.basis,
            "shape": list(self.shape),
        }


def _as_matrix(t: Tensor) -> Tensor:
    """View a tensor as the matrix whose columns a burst scales: (shape[0], -1); 1D as a row."""
    if t.ndim == 2:
        return t
    # view (not reshape): a burst must edit the tensor itself, never a silent copy.
    if t.ndim == 0:
        return t.view(1, 1)
    if t.ndim == 1:
        return t.view(1, -1)
    return t.view(t.shape[0], -1)


def burst_matrix_(
    x: Tensor, scale: float, columns: Tensor | None = None, directions: Tensor | None = None
) -> None:
    """Scale, in place, the columns ``columns`` of the matrix ``x`` by ``scale``, or its
    components along the orthonormal ``directions`` (``d_in x k``): ``x <- x + (s-1)(x Q)Q^T``.
    Exactly one of ``columns`` and ``directions`` is given. ``x`` must be 2D and may be a view."""
    if (columns is None) == (directions is None):
        raise ValueError("burst_matrix_: give exactly one of columns and directions")
    if columns is not None:
        x[:, columns] *= scale
        return
    q = directions.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    wide = x.to(q.dtype)
    x.copy_(wide + (scale - 1.0) * (wide @ q) @ q.mT)


@dataclass
class _Target:
    param: Tensor
    name: str
    index: int
    generator: torch.Generator
    columns: Tensor | None = None  # fixed column set (redraw=False, basis="columns")
    directions: Tensor | None = None  # fixed directions (redraw=False, basis="random")


class ColumnBurst:
    """Seeded column bursts on an optimizer's parameters, as a step pre-hook.

    Args:
        optimizer: any ``torch.optim.Optimizer``; the hook is registered on it at once.
        params: the parameters to burst (default: the optimizer's matrix-rule parameters,
            see the module docstring). Each must be in the optimizer's param groups and 2D
            unless ``include_non_matrix``.
        every: bursts fire every ``every`` steps (the paper's K_out).
        scale: the burst factor s (``"grad_add"``: the noise amplitude in units of the
            gradient's RMS). Must be finite; for the multiplicative modes s > 0.
        n_cols, frac: how many columns (or directions) burst: ``n_cols``, or
            ``max(1, round(frac * d_in))`` per parameter; at most one of them (default 1
            column), capped at d_in.
        mode: ``"momentum"``, ``"grad"`` or ``"grad_add"`` (module docstring).
        basis: ``"columns"`` or ``"random"``.
        redraw: draw a new column set (or basis) at every burst instead of once.
        start: the first burst step (default ``every``); ``stop``: the last possible one.
        include_non_matrix: allow parameters that are not 2D in ``params``; with
            ``params=None``, burst every parameter of the optimizer. Without it, a non-2D
            parameter in ``params`` is an error.
        seed: seeds every random draw. Parameter ``i`` of the target list draws from its
            own generator, so the bursts of one parameter do not depend on the others.

    Attributes:
        events: every :class:`BurstEvent`, in order. ``step``: the step t of the last
        ``optimizer.step()`` that the hook saw (0 before the first).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Iterable[Tensor] | None = None,
        *,
        every: int,
        scale: float = 10.0,
        n_cols: int | None = None,
        frac: float | None = None,
        mode: str = "momentum",
        basis: str = "columns",
        redraw: bool = False,
        start: int | None = None,
        stop: int | None = None,
        include_non_matrix: bool = False,
        seed: int = 0,
    ) -> None:
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"ColumnBurst: every must be an int >= 1, got {every!r}")
        if mode not in MODES:
            raise ValueError(f"ColumnBurst: mode must be one of {MODES}, got {mode!r}")
        if basis not in BASES:
            raise ValueError(f"ColumnBurst: basis must be one of {BASES}, got {basis!r}")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
            raise ValueError(f"ColumnBurst: scale must be a finite number, got {scale!r}")
        if mode != "grad_add" and scale <= 0:
            raise ValueError(f"ColumnBurst: a multiplicative burst needs scale > 0, got {scale}")
        if n_cols is not None and frac is not None:
            raise ValueError("ColumnBurst: give at most one of n_cols and frac")
        if n_cols is not None and not (isinstance(n_cols, int) and n_cols >= 1):
            raise ValueError(f"ColumnBurst: n_cols must be an int >= 1, got {n_cols!r}")
        if frac is not None and not (0.0 < frac <= 1.0):
            raise ValueError(f"ColumnBurst: frac must be in (0, 1], got {frac!r}")
        start = every if start is None else start
        if not (isinstance(start, int) and start >= 1):
            raise ValueError(f"ColumnBurst: start must be an int >= 1, got {start!r}")
        if stop is not None and not (isinstance(stop, int) and stop >= start):
            raise ValueError(f"ColumnBurst: stop must be None or an int >= start, got {stop!r}")
        self.optimizer = optimizer
        self.every, self.scale, self.mode, self.basis = every, float(scale), mode, basis
        self.n_cols, self.frac, self.redraw = n_cols, frac, bool(redraw)
        self.start, self.stop, self.seed = start, stop, int(seed)
        self.include_non_matrix = bool(include_non_matrix)
        self.events: list[BurstEvent] = []
        self._by_step: dict[int, list[BurstEvent]] = {}
        self._targets = self._select(params)
        self.step = max(
            (int(self.optimizer.state[t.param]["step"]) for t in self._targets
             if "step" in self.optimizer.state.get(t.param, {})),
            default=0,
        )
        self._handle = optimizer.register_step_pre_hook(self._hook)

    # ------------------------------------------------------------------------------------
    def _select(self, params: Iterable[Tensor] | None) -> list[_Target]:
        named: list[tuple[Tensor, str, bool]] = []  # (param, name, on a matrix rule)
        rule_of = getattr(self.optimizer, "rule_of", None)
        for gi, group in enumerate(self.optimizer.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                name = names[pi] if names is not None else f"group{gi}.param{pi}"
                on_matrix_rule = p.ndim == 2 and (rule_of is None or rule_of(group, p) != "adamw")
                named.append((p, name, on_matrix_rule))
        if params is None:
            chosen = [(p, n) for p, n, m in named if m or self.include_non_matrix]
        else:
            by_id = {id(p): (p, n) for p, n, _ in named}
            chosen = []
            for p in params:
                if id(p) not in by_id:
                    raise ValueError("ColumnBurst: a parameter in params is not in the optimizer")
                q, n = by_id[id(p)]
                if q.ndim != 2 and not self.include_non_matrix:
                    raise ValueError(
                        f"ColumnBurst: parameter {n!r} has shape {tuple(q.shape)}, not a matrix; "
                        "pass include_non_matrix=True to burst it"
                    )
                chosen.append((q, n))
        return [
            _Target(p, name, i, torch.Generator().manual_seed(_mix_seed(self.seed, i)))
            for i, (p, name) in enumerate(chosen)
        ]

    def _k(self, d_in: int) -> int:
        if self.n_cols is not None:
            return min(self.n_cols, d_in)
        if self.frac is not None:
            return min(max(1, round(self.frac * d_in)), d_in)
        return 1

    def _draw(self, target: _Target, d_in: int) -> tuple[Tensor | None, Tensor | None]:
        k = self._k(d_in)
        if self.basis == "columns":
            if target.columns is None or self.redraw:
                cols = torch.randperm(d_in, generator=target.generator)[:k].sort().values
                target.columns = cols
            return target.columns, None
        if target.directions is None or self.redraw:
            gauss = torch.randn(d_in, k, generator=target.generator, dtype=torch.float64)
            q, r = torch.linalg.qr(gauss)
            q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
            target.directions = q.to(torch.float32)
        return None, target.directions

    def fires_at(self, step: int) -> bool:
        """Whether bursts fire at step t (whatever the gradients)."""
        if step < self.start or (self.stop is not None and step > self.stop):
            return False
        return (step - self.start) % self.every == 0

    @torch.no_grad()
    def _hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        # torch passes the bound step's positional args, the optimizer itself first.
        positional = args[1:] if args and args[0] is optimizer else args
        closure = kwargs.get("closure", positional[0] if positional else None)
        if closure is not None:
            raise RuntimeError(
                "ColumnBurst: optimizer.step(closure) computes the gradient after the step "
                "pre-hooks run, so a burst would miss it; compute the loss and gradient "
                "before calling step() without a closure"
            )
        self.step += 1
        t = self.step
        if not self.fires_at(t):
            return
        for target in self._targets:
            p = target.param
            if p.grad is None:
                continue
            grad = _as_matrix(p.grad)
            d_out, d_in = grad.shape
            cols, dirs = self._draw(target, d_in)
            if self.mode == "grad_add":
                self._add_noise(target, grad, cols, dirs)
            else:
                if self.mode == "momentum":
                    state = optimizer.state.get(p, {})
                    for key in MOMENTUM_KEYS:
                        buf = state.get(key)
                        if isinstance(buf, Tensor) and buf.shape == p.shape:
                            burst_matrix_(_as_matrix(buf), self.scale, cols, dirs)
                burst_matrix_(grad, self.scale, cols, dirs)
            event = BurstEvent(
                step=t, param=target.name,
                columns=tuple(cols.tolist()) if cols is not None else (),
                scale=self.scale, mode=self.mode, basis=self.basis, shape=(d_out, d_in),
                directions=dirs,
            )
            self.events.append(event)
            self._by_step.setdefault(t, []).append(event)

    def _add_noise(
        self, target: _Target, grad: Tensor, cols: Tensor | None, dirs: Tensor | None
    ) -> None:
        d_out = grad.shape[0]
        k = cols.numel() if cols is not None else dirs.shape[1]
        rms = grad.float().pow(2).mean().sqrt().item()
        noise = torch.randn(d_out, k, generator=target.generator) * (self.scale * rms)
        if cols is not None:
            grad[:, cols] += noise.to(device=grad.device, dtype=grad.dtype)
        else:
            q = dirs.to(grad.device)
            grad.add_((noise.to(grad.device) @ q.mT).to(grad.dtype))

    # ------------------------------------------------------------------------------------
    @property
    def params(self) -> list[Tensor]:
        """The parameters this injector bursts, in the order their seeds are assigned."""
        return [t.param for t in self._targets]

    @property
    def param_names(self) -> list[str]:
        return [t.name for t in self._targets]

    @property
    def burst_steps(self) -> list[int]:
        """The steps at which at least one parameter burst, in order."""
        return sorted(self._by_step)

    def events_at(self, step: int) -> list[BurstEvent]:
        """The bursts fed into step t (empty when none)."""
        return list(self._by_step.get(step, ()))

    def remove(self) -> None:
        """Unregister the hook: later steps are not burst. The log is kept."""
        self._handle.remove()

    def __enter__(self) -> ColumnBurst:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _mix_seed(seed: int, index: int) -> int:
    """A 63-bit seed for target ``index`` under ``seed`` (splitmix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63

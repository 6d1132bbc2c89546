"""trasmuon in torchtitan (0.3): an ``OptimizersContainer`` that knows this package's
optimizers, and a config with the matrix/AdamW split of torchtitan's decoder models.

    from trasmuon.torchtitan import optimizer_config
    optimizer = optimizer_config("TrasMuon", lr=2e-2, weight_decay=0.1)  # in the job config
    # ... torchtitan builds it: optimizer.build(model_parts=model_parts)

The split, by torchtitan's parameter names (first match wins, docs/usage.md "torchtitan"):

* ``tok_embeddings.*`` and ``output.*`` or ``lm_head.*`` (the LM head): AdamW, weight decay as given
  (``decay_embeddings=False``: none), the head's lr ``head_lr`` if given;
* norm weights (``*norm*``) and biases: AdamW without weight decay;
* MoE ``GroupedExperts`` weights (``experts.w1_EFD``, ``w2_EDF``, ``w3_EFD``, also under
  ``routed_experts.inner_experts``: one (experts, out, in) stack each): the matrix rule with
  ``stacked=True``;
* every other parameter (attention and MLP projections, the MoE router): the matrix rule.

Every group goes to one optimizer of the named class (a group's ``rule`` picks AdamW), so a
step is one planned step. torchtitan's ``fused``/``foreach`` group keys are accepted and
ignored (the backend is the optimizer's ``backend`` option). Checkpoints go through
torchtitan's flat, name-keyed optimizer state dict and resume bit for bit; its LR schedulers
scale every group's lr.

Importing this module imports torchtitan (an optional dependency).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from torchtitan.components.optimizer import OptimizersContainer as _TitanContainer
from torchtitan.components.optimizer import ParamGroupConfig

from .classes import NAMO, NAMOD, AdamW, Muon, NorMuon, TrasMuon
from .optimizer import MatrixOptimizer

OPTIMIZERS: dict[str, type[MatrixOptimizer]] = {
    "TrasMuon": TrasMuon, "NorMuon": NorMuon, "Muon": Muon, "NAMO": NAMO, "NAMOD": NAMOD,
    "trasmuon.AdamW": AdamW,
}

# torchtitan's parameter names (canonical FQNs), as regular expressions.
EMBEDDING_PATTERN = r"(^|\.)tok_embeddings\."
HEAD_PATTERN = r"(^|\.)(output|lm_head)\."
NO_DECAY_PATTERN = r"norm[^.]*\.weight$|\.bias$"
EXPERTS_PATTERN = r"experts\.w[123]_[A-Za-z]+$"


def _matching(model_parts: list[Any], groups: list[ParamGroupConfig]) -> list[ParamGroupConfig]:
    """``groups`` without those whose pattern claims no trainable parameter of any part
    (first match wins, as torchtitan assigns them)."""
    kept, claimed = [], set()
    for pg in groups:
        pattern, hit = re.compile(pg.pattern), False
        for part in model_parts:
            for fqn, p in part.named_parameters():
                if p.requires_grad and (id(part), fqn) not in claimed and pattern.search(fqn):
                    claimed.add((id(part), fqn))
                    hit = True
        if hit:
            kept.append(pg)
    return kept


def _per_head(model_parts: list[Any], groups: list[ParamGroupConfig], ns_blocks: str) -> list[ParamGroupConfig]:
    """``groups`` with, before the catch-all (the last group), one group per distinct
    ``ns_blocks`` of the attention projection weights (``param_groups.head_blocks``), by name,
    with the catch-all's optimizer and settings."""
    from .param_groups import head_blocks

    if ns_blocks != "heads":
        raise ValueError(f"ns_blocks must be None or 'heads', got {ns_blocks!r}")
    by_blocks: dict[tuple[int, int], list[str]] = {}
    for part in model_parts:
        for name, blocks in head_blocks(part).values():
            by_blocks.setdefault(blocks, []).append(name)
    if not by_blocks:
        raise ValueError("ns_blocks='heads': no attention projection of the model was recognised")
    *first, catch_all = groups
    heads = [ParamGroupConfig(pattern="^(" + "|".join(re.escape(n) for n in names) + ")$",
                              optimizer_name=catch_all.optimizer_name,
                              optimizer_kwargs={**catch_all.optimizer_kwargs, "ns_blocks": blocks})
             for blocks, names in by_blocks.items()]
    return [*first, *heads, catch_all]


class OptimizersContainer(_TitanContainer):
    """torchtitan's ``OptimizersContainer`` with this package's optimizers among its names
    (``OPTIMIZERS``: ``optimizer_name="TrasMuon"`` and so on; torchtitan's own names still
    work)."""

    @dataclass(kw_only=True, slots=True)
    class Config(_TitanContainer.Config):
        ns_blocks: str | None = None
        """``"heads"``: every attention projection torchtitan's models name (``wq``, ``wk``,
        ``wv``, ``wqkv``, ``wo``) is orthogonalized per head (docs/rule.md, ``ns_blocks``),
        in a group of its own with the catch-all group's settings; None: whole matrices."""

    def __init__(self, config: Config, *, model_parts: list[Any]) -> None:
        groups = list(config.param_groups)
        if config.ns_blocks is not None:
            groups = _per_head(model_parts, groups, config.ns_blocks)
        # Patterns that claim no parameter are dropped (torchtitan refuses them; not every
        # model has experts or biases).
        super().__init__(replace(config, param_groups=_matching(model_parts, groups)),
                         model_parts=model_parts)

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Any:
        if name in OPTIMIZERS:
            return OPTIMIZERS[name]
        return _TitanContainer._resolve_optimizer_factory(name)


def param_group_configs(
    name: str = "TrasMuon",
    *,
    lr: float,
    weight_decay: float = 0.1,
    adamw_lr: float | None = None,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_eps: float = 1e-8,
    head_lr: float | None = None,
    decay_embeddings: bool = True,
    **matrix_kwargs: Any,
) -> list[ParamGroupConfig]:
    """The ``ParamGroupConfig`` list of the split above for optimizer ``name`` (a key of
    ``OPTIMIZERS``). ``matrix_kwargs``: the matrix rule's hyperparameters beyond lr and
    weight decay, and the optimizer's options (``backend``, ``check_finite``, ...) are not
    group keys: give those in ``optimizer_factory_kwargs_by_name`` (``optimizer_config``
    does)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"name must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    adamw_lr = lr if adamw_lr is None else adamw_lr
    adamw = {"rule": "adamw", "betas": adamw_betas, "eps": adamw_eps}
    embedding_decay = weight_decay if decay_embeddings else 0.0
    matrix = {"lr": lr, "weight_decay": weight_decay, **matrix_kwargs}
    return [
        ParamGroupConfig(pattern=EMBEDDING_PATTERN, optimizer_name=name,
                         optimizer_kwargs={**adamw, "lr": adamw_lr, "weight_decay": embedding_decay}),
        ParamGroupConfig(pattern=HEAD_PATTERN, optimizer_name=name,
                         optimizer_kwargs={**adamw, "lr": adamw_lr if head_lr is None else head_lr,
                                           "weight_decay": embedding_decay}),
        ParamGroupConfig(pattern=NO_DECAY_PATTERN, optimizer_name=name,
                         optimizer_kwargs={**adamw, "lr": adamw_lr, "weight_decay": 0.0}),
        ParamGroupConfig(pattern=EXPERTS_PATTERN, optimizer_name=name,
                         optimizer_kwargs={**matrix, "stacked": True}),
        ParamGroupConfig(pattern=r".*", optimizer_name=name, optimizer_kwargs=matrix),
    ]


_OPTIONS = ("backend", "check_finite", "diagnostics", "process_group", "check_consistency", "cuda_graph")


def optimizer_config(name: str = "TrasMuon", *, lr: float, implementation: str = "fused",
                     ns_blocks: str | None = None, **kwargs: Any) -> OptimizersContainer.Config:
    """An ``OptimizersContainer.Config`` (this module's container) with
    ``param_group_configs(name, lr=lr, ...)``; the optimizer's options among ``kwargs``
    (``backend``, ``check_finite``, ``diagnostics``, ``process_group``,
    ``check_consistency``, ``cuda_graph``) go to its constructor. ``ns_blocks="heads"``:
    attention projections orthogonalized per head (the container's ``ns_blocks``).
    ``implementation``:
    torchtitan's (it writes ``fused``/``foreach`` into every group; this package's
    optimizers accept and ignore them). A pattern that matches no
    parameter is dropped when the container is built (torchtitan refuses those: not every
    model has experts or biases)."""
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    return OptimizersContainer.Config(
        param_groups=param_group_configs(name, lr=lr, **kwargs),
        implementation=implementation, ns_blocks=ns_blocks,
        optimizer_factory_kwargs_by_name={name: options} if options else {},
    )


__all__ = ["EMBEDDING_PATTERN", "EXPERTS_PATTERN", "HEAD_PATTERN", "NO_DECAY_PATTERN", "OPTIMIZERS",
           "OptimizersContainer", "optimizer_config", "param_group_configs"]

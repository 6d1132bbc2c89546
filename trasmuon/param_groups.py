"""Split a model's parameters the way Muon-family practice recommends.

Orthogonalized updates suit the *hidden* weight matrices of a network: their inputs and
outputs are activations, and a spectral-norm step bounds how much each layer's output can
move. Three kinds of parameters do not fit that picture and go to AdamW instead:

- embeddings: a lookup table whose rows are read one token at a time, so a row receives a
  gradient only when its token occurs; orthogonalizing the whole table mixes the rare rows'
  updates with the frequent ones (Muon, Moonlight and NorMuon all keep them on AdamW);
- the output head (``lm_head``, a classifier): its outputs are logits, where per-coordinate
  (Adam) scaling has been found to train better than a spectral step;
- every parameter that is not 2D, but convolution weights: biases, norm gains, scalars (no
  matrix to orthogonalize).

Convolutions. The weight of an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``, (out, in,
*kernel), goes to a matrix group with ``flatten=True``: the rules see the (out, in *
prod(kernel)) matrix.

Orientation. The matrix rules read a weight as (out_features, in_features), nn.Linear's
layout: rows are output features (the row normalization acts on them) and columns input
features (the column gate acts on them). Hugging Face ``transformers`` models built on
``transformers.pytorch_utils.Conv1D`` (GPT-2 and its relatives) store their weights as
(in_features, out_features); those matrices go in a group of their own with
``orientation="in_out"``, so the rules see them the right way round.

Weight decay. As in nanoGPT, Hugging Face's Trainer and torchtitan's recipes that exclude
them, parameters of fewer than two dims (biases, norm gains, scalars) get no weight decay:
they go to an AdamW group with ``weight_decay=0.0``. Embedding tables keep the optimizer's
weight decay (the nanoGPT and Trainer convention; OLMo 2 exempts them:
``decay_embeddings=False``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .optimizer import MATRIX_RULES

# Module names (last component of the qualified name) taken as output heads by default.
HEAD_NAMES = ("lm_head", "head", "classifier", "output_head")
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _expert_orientation(name: str) -> str:
    """How a torchtitan ``GroupedExperts`` stores its (E, ., .) weights: since torchtitan 0.3
    (E, out, in), named with their dims (``w1_EFD``, ``w2_EDF``); before, ``w1``/``w2``/``w3``
    as (E, in, out), multiplied as ``x @ w``."""
    return "out_in" if name.endswith(("_EFD", "_EDF")) else "in_out"


def _flattens(p: Any) -> bool:
    """Whether a weight can be viewed as (out, -1) without a copy (not channels_last)."""
    local = p.to_local() if hasattr(p, "to_local") else p
    try:
        local.view(local.shape[0], -1)
    except RuntimeError:
        return False
    return True


def stores_in_out(module: nn.Module) -> bool:
    """Whether ``module``'s ``weight`` is stored (in_features, out_features): a
    ``transformers`` Conv1D (checked only if transformers is imported: a model built from it
    cannot exist otherwise)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def split_params(
    model: nn.Module,
    *,
    matrix_rule: str | None = None,
    head: str | Iterable[str] | None = "auto",
    matrix_options: dict[str, Any] | None = None,
    adamw_options: dict[str, Any] | None = None,
    no_decay_options: dict[str, Any] | None = None,
    decay_embeddings: bool = True,
    head_lr: float | Callable[[int], float] | None = None,
) -> list[dict[str, Any]]:
    """Param groups for a Muon-family optimizer: hidden matrices, and the rest on AdamW.

    Args:
        model: the module whose trainable parameters (``requires_grad``) are split.
        matrix_rule: rule of the matrix groups (``"trasmuon"``, ``"normuon"``, ``"muon"``,
            ``"namo"``, ``"namo_d"``); None lets the optimizer's own matrix rule apply.
        head: which modules are output heads. ``"auto"``: modules named one of
            ``HEAD_NAMES``, and any module whose weight is an embedding's weight (tied).
            Otherwise a name or names, each matched against a module's qualified name or
            its last component. None: no head.
        matrix_options, adamw_options: extra group keys (``lr``, ``weight_decay``, ...) of the
            matrix groups and of every AdamW group.
        no_decay_options: extra keys of the AdamW group of the parameters of fewer than two
            dims, which has ``weight_decay=0.0`` unless these say otherwise.
        decay_embeddings: False puts embedding tables in the no-decay group too.
        head_lr: give the heads' weights an AdamW group of their own with this lr: a float,
            or a function of the head's input dim (Dion's ``lambda d_in: lr / d_in ** 0.5``).
            A head tied to an embedding stays with the embeddings. None: heads share the
            AdamW group.

    Returns a list of param groups whose params are ``(name, parameter)`` pairs, so the
    optimizer's errors and diagnostics name them, in this order (empty groups are left out):
    the (out, in) matrices; the (in, out) matrices of ``transformers`` Conv1D modules
    (``orientation="in_out"``); the weights of ``nn.Conv1d/2d/3d`` as (out, in *
    prod(kernel)) matrices (``flatten=True``; a weight whose memory format cannot be viewed
    so, e.g. channels_last, goes to AdamW); the 3-D expert stacks of torchtitan's
    ``GroupedExperts`` (``stacked=True``, in the orientation its version stores them); the
    heads (with ``head_lr``); the decayed AdamW params; the AdamW params without decay.
    """
    if matrix_rule is not None and matrix_rule not in MATRIX_RULES:
        raise ValueError(f"matrix_rule must be None or one of {MATRIX_RULES}, got {matrix_rule!r}")
    if not isinstance(decay_embeddings, bool):
        raise ValueError(f"decay_embeddings must be a bool, got {decay_embeddings!r}")
    if head_lr is not None and not callable(head_lr) and not (
            isinstance(head_lr, (int, float)) and head_lr >= 0):
        raise ValueError(f"head_lr must be None, a float >= 0 or a function of d_in, got {head_lr!r}")
    if head == "auto":
        head_names: tuple[str, ...] = HEAD_NAMES
    elif head is None:
        head_names = ()
    elif isinstance(head, str):
        head_names = (head,)
    else:
        head_names = tuple(head)

    embedding_weights = {
        id(m.weight) for m in model.modules() if isinstance(m, _EMBEDDINGS)
    }
    to_adamw: set[int] = set(embedding_weights)
    heads: set[int] = set()
    for name, module in model.named_modules():
        is_head = name in head_names or name.rsplit(".", 1)[-1] in head_names
        if is_head:
            to_adamw.update(id(p) for p in module.parameters())
            heads.update(id(p) for p in module.parameters() if p.ndim >= 2)
        elif head == "auto" and id(getattr(module, "weight", None)) in embedding_weights:
            to_adamw.add(id(module.weight))
    heads -= embedding_weights  # a tied head is an embedding table

    in_out = {id(m.weight) for m in model.modules() if stores_in_out(m)}
    conv = {id(m.weight) for m in model.modules() if isinstance(m, _CONVOLUTIONS)}
    experts = {id(p): _expert_orientation(n) for m in model.modules() if type(m).__name__ == "GroupedExperts"
               for n, p in m.named_parameters(recurse=False) if p.ndim == 3}
    matrix, matrix_in_out, matrix_flat, head_params, decayed, no_decay = [], [], [], [], [], []
    stacks: dict[str, list] = {"out_in": [], "in_out": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 2 and id(p) not in to_adamw:
            (matrix_in_out if id(p) in in_out else matrix).append((name, p))
        elif p.ndim > 2 and id(p) in conv and id(p) not in to_adamw and _flattens(p):
            matrix_flat.append((name, p))
        elif id(p) in experts and id(p) not in to_adamw:
            stacks[experts[id(p)]].append((name, p))
        elif id(p) in heads and head_lr is not None:
            head_params.append((name, p))
        elif p.ndim < 2 or (id(p) in embedding_weights and not decay_embeddings):
            no_decay.append((name, p))
        else:
            decayed.append((name, p))

    matrix_keys = {"rule": matrix_rule, **(matrix_options or {})}
    adamw_keys = {"rule": "adamw", **(adamw_options or {})}
    groups = []
    if matrix:
        groups.append({"params": matrix, **matrix_keys})
    if matrix_in_out:
        groups.append({"params": matrix_in_out, **matrix_keys, "orientation": "in_out"})
    if matrix_flat:
        groups.append({"params": matrix_flat, **matrix_keys, "flatten": True})
    for orientation, stack in stacks.items():
        if stack:
            groups.append({"params": stack, **matrix_keys, "stacked": True, "orientation": orientation})
    for name, p in head_params:  # one group per head: its lr may depend on its d_in
        d_in = p.shape[0] if id(p) in in_out else p.shape[-1]
        lr = head_lr(int(d_in)) if callable(head_lr) else head_lr
        groups.append({"params": [(name, p)], **adamw_keys, "lr": float(lr)})
    if decayed:
        groups.append({"params": decayed, **adamw_keys})
    if no_decay:
        groups.append({"params": no_decay, **adamw_keys, "weight_decay": 0.0, **(no_decay_options or {})})
    return groups

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


# Per-head Newton–Schulz (``split_params(ns_blocks="heads")``; docs/rule.md, "Per-head
# orthogonalization"): attention projections whose rows (q, k, v) or columns (the output
# projection) are heads (``head_blocks``).
NS_BLOCK_MODES = ("heads",)


def _int_attr(obj: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _oriented_shape(module: nn.Module) -> tuple[int, int]:
    """The (out, in) shape of a projection's weight (a Conv1D stores (in, out))."""
    rows, cols = module.weight.shape
    return (cols, rows) if stores_in_out(module) else (rows, cols)


def head_blocks(model: nn.Module) -> dict[int, tuple[str, tuple[int, int]]]:
    """The ``ns_blocks`` of every attention projection of ``model`` that is recognised, as
    ``id(weight) -> (qualified name, (row_blocks, col_blocks))``, in (out, in) terms:

    * Hugging Face attention with ``q_proj``/``k_proj``/``v_proj`` (or a fused ``qkv_proj``)
      and ``o_proj`` (Llama, Mistral, Qwen, ...): the head counts from the attention module's
      ``config`` (or the model's): ``num_attention_heads`` and ``num_key_value_heads``; q
      takes (n_heads, 1), k and v (n_kv_heads, 1), a fused qkv (n_heads + 2 n_kv_heads, 1),
      o (1, n_heads);
    * GPT-2's attention (``transformers`` Conv1D, stored (in, out)): ``c_attn`` takes
      (d_out / head_dim, 1), i.e. (3 n_head, 1) for self-attention, ``q_attn`` (n_head, 1),
      and the attention's ``c_proj`` (1, n_head) (the MLP's ``c_proj`` is left whole);
    * torchtitan's attention (a module with ``n_heads``, ``n_kv_heads`` and ``wq``, ``wk``,
      ``wv`` or a fused ``wqkv``, and ``wo``, directly or in a child such as ``qkv_linear``).

    A count that does not divide its side of the weight raises a ValueError naming it."""
    found: dict[int, tuple[str, tuple[int, int]]] = {}
    model_config = getattr(model, "config", None)

    def add(name: str, module: nn.Module, blocks: tuple[int, int]) -> None:
        shape = _oriented_shape(module)
        if shape[0] % blocks[0] or shape[1] % blocks[1]:
            raise ValueError(
                f"split_params(ns_blocks='heads'): {name} has the (out, in) shape {shape}, which "
                f"the head counts do not divide into ns_blocks={blocks}")
        found[id(module.weight)] = (name, blocks)

    for mname, module in model.named_modules():
        children = dict(module.named_children())
        prefix = f"{mname}." if mname else ""
        weighted = {k: c for k, c in children.items()
                    if isinstance(getattr(c, "weight", None), nn.Parameter) and c.weight.ndim == 2}
        if "o_proj" in weighted and any(k in weighted for k in ("q_proj", "qkv_proj")):
            config = getattr(module, "config", None) or model_config
            n_heads = _int_attr(config, "num_attention_heads", "n_head")
            if n_heads is None:
                continue
            n_kv = _int_attr(config, "num_key_value_heads") or n_heads
            counts = {"q_proj": n_heads, "k_proj": n_kv, "v_proj": n_kv, "qkv_proj": n_heads + 2 * n_kv}
            for key, count in counts.items():
                if key in weighted:
                    add(f"{prefix}{key}.weight", weighted[key], (count, 1))
            add(f"{prefix}o_proj.weight", weighted["o_proj"], (1, n_heads))
        elif "c_attn" in weighted and stores_in_out(weighted["c_attn"]):
            n_heads = _int_attr(module, "num_heads") or _int_attr(model_config, "n_head")
            embed = _int_attr(module, "embed_dim") or _int_attr(model_config, "n_embd")
            head_dim = _int_attr(module, "head_dim") or (embed // n_heads if embed and n_heads else None)
            if n_heads is None or not head_dim:
                continue
            for key in ("c_attn", "q_attn"):  # (cross-attention's c_attn is k and v: 2 n_head)
                if key in weighted:
                    d_out = _oriented_shape(weighted[key])[0]
                    add(f"{prefix}{key}.weight", weighted[key], (max(d_out // head_dim, 1), 1))
            if "c_proj" in weighted:
                add(f"{prefix}c_proj.weight", weighted["c_proj"], (1, n_heads))
        elif _int_attr(module, "n_heads") is not None:
            n_heads = _int_attr(module, "n_heads")
            n_kv = _int_attr(module, "n_kv_heads") or n_heads
            counts = {"wq": (n_heads, 1), "wk": (n_kv, 1), "wv": (n_kv, 1),
                      "wqkv": (n_heads + 2 * n_kv, 1), "wo": (1, n_heads)}
            for sub, child in module.named_modules():  # directly, or in e.g. qkv_linear
                last = sub.rsplit(".", 1)[-1]
                weight = getattr(child, "weight", None)
                if (last in counts and sub.count(".") <= 1 and isinstance(weight, nn.Parameter)
                        and weight.ndim == 2):
                    add(f"{prefix}{sub}.weight", child, counts[last])
    return found


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
    ns_blocks: str | None = None,
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
        ns_blocks: ``"heads"`` orthogonalizes each attention head of the recognised
            attention projections on its own (the group key ``ns_blocks``, docs/rule.md,
            "Per-head orthogonalization"; which models and projections: ``head_blocks``): those
            matrices go in groups of their own, one per distinct ``ns_blocks``, after their
            orientation's matrix group. A ValueError if nothing is recognised. None (default):
            every matrix is orthogonalized whole.

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

    blocked: dict[int, tuple[str, tuple[int, int]]] = {}
    if ns_blocks is not None:
        if ns_blocks not in NS_BLOCK_MODES:
            raise ValueError(f"ns_blocks must be None or one of {NS_BLOCK_MODES}, got {ns_blocks!r}")
        blocked = head_blocks(model)
        if not any(id(p) in blocked for _, p in matrix + matrix_in_out):
            raise ValueError(
                f"split_params(ns_blocks='heads'): no attention projection of {type(model).__name__} "
                "was recognised (Hugging Face q_proj/k_proj/v_proj/o_proj with a config's "
                "num_attention_heads, GPT-2's c_attn/c_proj, torchtitan's wq/wk/wv/wqkv/wo); set "
                "ns_blocks in your own param groups instead")

    def by_blocks(params: list) -> list[tuple[tuple[int, int] | None, list]]:
        """``params`` split into the whole matrices (None) and one list per ns_blocks."""
        out: dict[tuple[int, int] | None, list] = {None: []}
        for name, p in params:
            out.setdefault(blocked[id(p)][1] if id(p) in blocked else None, []).append((name, p))
        return [(k, v) for k, v in out.items() if v]

    matrix_keys = {"rule": matrix_rule, **(matrix_options or {})}
    adamw_keys = {"rule": "adamw", **(adamw_options or {})}
    groups = []
    for blocks, params in by_blocks(matrix):
        groups.append({"params": params, **matrix_keys, **({"ns_blocks": blocks} if blocks else {})})
    for blocks, params in by_blocks(matrix_in_out):
        groups.append({"params": params, **matrix_keys, "orientation": "in_out",
                       **({"ns_blocks": blocks} if blocks else {})})
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

"""trasmuon inside torchtitan (trasmuon/torchtitan.py): torchtitan's debug Llama 3 trains on
2 CPU gloo ranks under FSDP2 (``fully_shard``: torchtitan's ``parallelize_llama`` wants a
CUDA device mesh) with TrasMuon through torchtitan's ``OptimizersContainer`` and its LR
scheduler; a run resumed from a DCP checkpoint of the container (torchtitan's flat,
name-keyed optimizer state) continues bit for bit. flex attention, the model's attention,
has no backward on the CPU: causal SDPA takes its place (the optimizer does not see it)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("torchtitan", reason="torchtitan is not installed (the test extra installs it)")

from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
from torchtitan.models.llama3 import llama3_configs

from trasmuon.torchtitan import OptimizersContainer, optimizer_config, param_group_configs

from .test_distributed import read_report, run_workers, write_report

STEPS, CHECKPOINT_AT = 10, 5


class CausalSDPA(torch.nn.Module):
    """torchtitan's inner attention interface, computed by causal SDPA."""

    def forward(self, q, k, v, *, attention_masks=None, scale=None, enable_gqa=False, **kwargs):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=scale, enable_gqa=enable_gqa)
        return out.transpose(1, 2)


def debug_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = llama3_configs["debugmodel"]("flex").build()
    model.init_weights()
    for layer in model.layers.values():
        layer.attention.inner_attention = CausalSDPA()
    return model


def test_the_split_of_the_debug_model():
    model = debug_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchtitan's fused/foreach keys are accepted silently
        opt = optimizer_config("TrasMuon", lr=0.02, weight_decay=0.1).build(model_parts=[model])
    (inner,) = opt.optimizers
    group_of = {n: g for g in inner.param_groups for n in g["param_names"]}
    assert set(group_of) == {n for n, _ in model.named_parameters()}
    for name, g in group_of.items():
        if name in ("tok_embeddings.weight", "lm_head.weight"):
            assert (g["rule"], g["weight_decay"], g["betas"]) == ("adamw", 0.1, (0.9, 0.95)), name
        elif "norm" in name:
            assert (g["rule"], g["weight_decay"]) == ("adamw", 0.0), name
        else:  # attention and MLP projections: the matrix rule
            assert g["rule"] is None and g["weight_decay"] == 0.1 and g["lr"] == 0.02, name
            assert "attention" in name or "feed_forward" in name
    assert sum(g["rule"] is None for g in group_of.values()) == 5 * len(model.layers)
    # torchtitan's own group keys (its default implementation, "fused")
    assert all(g["fused"] is True and g["foreach"] is False for g in inner.param_groups)
    with pytest.raises(ValueError, match="name must be one of"):
        param_group_configs("SGD", lr=0.1)


def test_moe_experts_are_stacked():
    # DeepSeek-V3's debug model: routed experts are (experts, out, in) stacks.
    from torchtitan.models.deepseek_v3 import deepseekv3_configs

    torch.manual_seed(0)
    model = deepseekv3_configs["debugmodel"]("flex", "standard").build()
    opt = optimizer_config("TrasMuon", lr=0.02).build(model_parts=[model])
    (inner,) = opt.optimizers
    group_of = {n: g for g in inner.param_groups for n in g["param_names"]}
    experts = [n for n in group_of if "inner_experts" in n]
    assert experts and all(group_of[n]["stacked"] and group_of[n]["rule"] is None for n in experts)
    assert all(dict(model.named_parameters())[n].ndim == 3 for n in experts)
    for name in ("layers.1.moe.router.gate.weight", "layers.1.moe.shared_experts.w1.weight"):
        assert group_of[name]["rule"] is None and not group_of[name].get("stacked"), name
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()


def test_attention_per_head():
    model = debug_model()
    opt = optimizer_config("TrasMuon", lr=0.02, ns_blocks="heads").build(model_parts=[model])
    group_of = {n: g for g in opt.optimizers[0].param_groups for n in g["param_names"]}
    n_heads = model.layers["0"].attention.n_heads
    assert group_of["layers.0.attention.qkv_linear.wqkv.weight"]["ns_blocks"] == (3 * n_heads, 1)
    assert group_of["layers.0.attention.wo.weight"]["ns_blocks"] == (1, n_heads)
    assert group_of["layers.0.feed_forward.w1.weight"]["ns_blocks"] == (1, 1)
    assert group_of["layers.0.attention.wo.weight"]["lr"] == 0.02
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()


def test_an_unknown_name_is_torchtitans_error():
    with pytest.raises(NotImplementedError):
        OptimizersContainer._resolve_optimizer_factory("NoSuchOptimizer")


def _train(model, opt, sched, data, steps) -> list[float]:
    losses = []
    for step in steps:
        batch = data[step]
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _fsdp_worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpointer.base import ModelWrapper  # what its checkpointer saves

    def build():
        model = debug_model()
        for layer in model.layers.values():
            fully_shard(layer)
        fully_shard(model)
        opt = optimizer_config("TrasMuon", lr=0.02, weight_decay=0.1).build(model_parts=[model])
        sched = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=opt, training_steps=STEPS)
        return model, opt, sched

    # Each rank its own two batches, taken in turn: ten steps can memorize them.
    gen = torch.Generator().manual_seed(1 + rank)
    batches = [torch.randint(0, 2048, (2, 33), generator=gen) for _ in range(2)]
    data = [batches[step % 2] for step in range(STEPS)]
    model, opt, sched = build()
    losses = _train(model, opt, sched, data, range(CHECKPOINT_AT))
    path = f"{tmp}/ckpt"
    dcp.save({"model": ModelWrapper(model), "optimizer": opt, "lr_scheduler": sched},
             checkpoint_id=path)
    losses += _train(model, opt, sched, data, range(CHECKPOINT_AT, STEPS))

    resumed, r_opt, r_sched = build()
    dcp.load({"model": ModelWrapper(resumed), "optimizer": r_opt, "lr_scheduler": r_sched},
             checkpoint_id=path)
    r_losses = _train(resumed, r_opt, r_sched, data, range(CHECKPOINT_AT, STEPS))

    same_weights = all(torch.equal(a.to_local(), b.to_local())
                       for a, b in zip(model.parameters(), resumed.parameters(), strict=True))
    (inner,), (r_inner,) = opt.optimizers, r_opt.optimizers
    same_state = all(
        torch.equal(getattr(x, "to_local", lambda x=x: x)(), getattr(y, "to_local", lambda y=y: y)())
        for p, q in zip(model.parameters(), resumed.parameters(), strict=True)
        for (kx, x), (ky, y) in zip(sorted(inner.state[p].items()), sorted(r_inner.state[q].items()), strict=True)
        if kx == ky and isinstance(x, torch.Tensor))
    same_keys = all(sorted(inner.state[p]) == sorted(r_inner.state[q])
                    for p, q in zip(model.parameters(), resumed.parameters(), strict=True))
    lrs = [g["lr"] for g in r_inner.param_groups]
    reports = [None] * world
    dist.all_gather_object(reports, {
        "losses": losses, "resumed": r_losses, "same_weights": same_weights,
        "same_state": same_state, "same_keys": same_keys, "lrs": lrs,
        "lr_final": [g["lr"] for g in inner.param_groups]})
    write_report(tmp, {"ranks": reports})


def test_fsdp2_trains_and_resumes_bit_for_bit(tmp_path):
    run_workers(_fsdp_worker, 2, tmp_path)
    for report in read_report(tmp_path)["ranks"]:
        losses = report["losses"]
        assert losses[-1] < 0.8 * losses[0], losses  # it learns
        assert report["resumed"] == losses[CHECKPOINT_AT:], (report["resumed"], losses)
        assert report["same_weights"] and report["same_state"] and report["same_keys"]
        # torchtitan's schedule (linear warmup, then decay) reached every group
        assert report["lrs"] == report["lr_final"] and len(set(report["lrs"])) == 1
        assert report["lrs"][0] < 0.02

"""Per-head (block) Newton–Schulz, the group key ``ns_blocks`` (docs/rule.md, "Per-head
orthogonalization"), on both backends (the Triton one under TRITON_INTERPRET=1 on the CPU).

O is judged against an independent per-block float64 reference: every block orthogonalized
on its own with ``reference.newton_schulz`` in float64 and the results put in place by
indexing (not by ``reference.merge_blocks``), with the tolerance table's bf16 chain bound.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import trasmuon
from trasmuon import NAMO, NAMOD, Muon, NorMuon, TrasMuon
from trasmuon import reference as ref
from trasmuon_kernels.testing import TOLERANCES, relative_fro_error

from .test_fused_backend import grads_for, steps_against_float64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = TOLERANCES[torch.bfloat16]
CLASSES = [TrasMuon, NorMuon, Muon, NAMO, NAMOD]
# The O checks run Muon's pipeline with TrasMuon's converging schedule: Muon's own quintic
# does not converge (its singular values oscillate in about [0.7, 1.1]), and its bf16 chain
# is up to 0.034 off float64 on 8 x 12 Gaussian matrices, whole, beyond the table's bound.
TRASMUON_SCHEDULE = dict(ns_coefficients=ref.TRASMUON_NS_COEFFICIENTS)


def per_block_reference(x: torch.Tensor, blocks, schedule, eps) -> torch.Tensor:
    """O of ``x`` (d_out, d_in) with each block of the ``blocks`` grid orthogonalized on its
    own in float64, assembled by indexing."""
    rb, cb = blocks
    bm, bn = x.shape[0] // rb, x.shape[1] // cb
    out = torch.empty(x.shape, dtype=torch.float64)
    for i in range(rb):
        for j in range(cb):
            block = x[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].double().cpu()
            out[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = ref.newton_schulz(block, schedule, eps, torch.float64)
    return out


def params_of(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, dtype)) for s in shapes]


def one_step(cls, shapes, blocks, backend, **kw):
    """One step of ``cls`` with ``ns_blocks=blocks``; returns (params, optimizer, O per param)."""
    ps = params_of(shapes)
    opt = cls([{"params": ps, "ns_blocks": blocks}], lr=0.02, backend=backend, **kw)
    gen = torch.Generator().manual_seed(1)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, p.dtype)
    opt.step()
    ortho = {}
    for b in opt._plan.matrices:
        for i, p in enumerate(b.params):
            ortho[id(p)] = b.ortho[i]
    return ps, opt, [ortho[id(p)] for p in ps]


# --------------------------------------------------------------------------------------
# The reference helpers
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", [(1, 1), (3, 1), (1, 4), (3, 2)])
def test_split_and_merge_blocks(blocks):
    x = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)
    stack = ref.split_blocks(x, blocks)
    rb, cb = blocks
    bm, bn = 6 // rb, 8 // cb
    assert stack.shape == (rb * cb, bm, bn)
    for i in range(rb):
        for j in range(cb):
            assert torch.equal(stack[i * cb + j], x[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn])
    if cb == 1:  # a split along rows is a view
        assert stack.data_ptr() == x.data_ptr()
    assert torch.equal(ref.merge_blocks(stack, blocks), x)
    batched = torch.stack([x, -x])
    assert torch.equal(ref.merge_blocks(ref.split_blocks(batched, blocks), blocks), batched)


def test_block_shape_problems():
    assert ref.ns_blocks_problem((2, 3), (4, 9)) is None
    assert "ns_blocks=(3, 1)" in ref.ns_blocks_problem((3, 1), (4, 9))
    assert ref.ns_blocks_problem((1, 2), (4, 9)) is not None
    with pytest.raises(ValueError, match="must divide"):
        ref.ns_block_shape((4, 9), (4, 2))


# --------------------------------------------------------------------------------------
# Blocked O against the per-block float64 reference, both backends
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("blocks", [(2, 1), (1, 3), (2, 3)])
@pytest.mark.parametrize("shape", [(8, 24), (24, 12)], ids=["wide", "tall"])
def test_blocked_ns_matches_per_block_float64(backend, blocks, shape):
    """The O of a Muon step (its NS input is the momentum, rounded to bf16) on a wide and a
    tall matrix whose blocks are wide, tall or square."""
    ps, opt, ortho = one_step(Muon, [shape, shape], blocks, backend, nesterov=False, **TRASMUON_SCHEDULE)
    g = opt.param_groups[0]
    schedule = ref.ns_schedule(g["ns_coefficients"], g["ns_steps"])
    for p, o in zip(ps, ortho, strict=True):
        x = opt.state[p]["momentum"].to(torch.bfloat16)
        want = per_block_reference(x, blocks, schedule, g["eps"])
        assert o.dtype == torch.bfloat16 and o.shape == shape
        err = relative_fro_error(o, want)
        assert err < BF16.fro, (backend, blocks, shape, err)
        # and it is not the whole matrix's O (far outside the bound)
        whole = ref.newton_schulz(x.double().cpu(), schedule, g["eps"], torch.float64)
        assert relative_fro_error(o, whole) > 5 * BF16.fro


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_blocked_gram_ns_matches_per_block_float64(backend):
    """ns_method="gram-always": each block takes the Gram form (float64 Gram equals the
    standard iteration to 1e-15, so the standard float64 reference judges it)."""
    blocks, shape = (2, 3), (8, 24)
    ps, opt, ortho = one_step(Muon, [shape], blocks, backend, nesterov=False, ns_method="gram-always",
                              **TRASMUON_SCHEDULE)
    g = opt.param_groups[0]
    schedule = ref.ns_schedule(g["ns_coefficients"], g["ns_steps"])
    x = opt.state[ps[0]]["momentum"].to(torch.bfloat16)
    err = relative_fro_error(ortho[0], per_block_reference(x, blocks, schedule, g["eps"]))
    assert err < BF16.fro, err


def test_triton_column_blocks_equal_the_kernel_on_the_blocks():
    """The Triton path's copies in and out of the block-major stack are exact: O equals the
    NS kernel run on ``reference.split_blocks`` of the same bf16 X (a kernel compared with
    itself: bitwise, same configs)."""
    from trasmuon_kernels.newton_schulz import newton_schulz as kernel_ns

    blocks, shape = (2, 3), (8, 24)
    ps, opt, ortho = one_step(Muon, [shape, shape], blocks, "triton", nesterov=False, **TRASMUON_SCHEDULE)
    g = opt.param_groups[0]
    schedule = ref.ns_schedule(g["ns_coefficients"], g["ns_steps"])
    x = torch.stack([opt.state[p]["momentum"] for p in ps]).to(torch.bfloat16)
    o = kernel_ns(ref.split_blocks(x, blocks).contiguous(), schedule, g["eps"])
    assert torch.equal(torch.stack(list(ortho)), ref.merge_blocks(o, blocks))


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_blocked_row_sums_are_whole_rows(backend):
    """NorMuon's row statistics see the whole O: after one step from zero state, row_v =
    (1 - b2) * (1/d_in) * sum_j O_ij^2 over every column block of the row."""
    shape, blocks = (8, 24), (2, 3)
    ps, opt, ortho = one_step(NorMuon, [shape], blocks, backend)
    b2 = opt.param_groups[0]["betas"][1]
    o = ortho[0].float()
    want = (1 - b2) * o.square().sum(1) / shape[1]
    torch.testing.assert_close(opt.state[ps[0]]["row_v"], want, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------
# (1, 1) is today's step; full steps agree across backends
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("cls", CLASSES)
def test_default_blocks_are_bit_identical(cls, backend):
    """ns_blocks=(1, 1) set explicitly is the step without the key, bit for bit, and on the
    eager backend O is ``reference.newton_schulz`` of the whole matrix, bit for bit."""
    shapes = [(12, 20), (20, 12)]
    runs = []
    for group in ({}, {"ns_blocks": (1, 1)}):
        ps = params_of(shapes)
        opt = cls([{"params": ps, **group}], lr=0.02, backend=backend)
        gen = torch.Generator().manual_seed(3)
        for step in range(1, 4):
            for p, gr in zip(ps, grads_for(step, ps, gen), strict=True):
                p.grad = gr
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    assert oa.param_groups[0]["ns_blocks"] == (1, 1)
    for p, q in zip(pa, pb, strict=True):
        assert torch.equal(p, q)
        for k, v in oa.state[p].items():
            assert torch.equal(v, ob.state[q][k]), k
    if backend == "eager":
        g = ob.param_groups[0]
        rule = trasmuon.rules.get_rule(ob.matrix_rule)
        for b in ob._plan.matrices:
            for x, o in zip(b.ns_input, b.ortho, strict=True):
                assert torch.equal(o, ref.newton_schulz(x, rule.ns_schedule(g), rule.ns_eps(g), g["ns_dtype"]))


@pytest.mark.parametrize("cls", CLASSES)
def test_full_steps_with_blocks_agree_across_backends(cls):
    """Three steps with row, column and both kinds of blocks (one bf16 matrix): each bf16
    run against the eager backend's run with float64 Newton–Schulz, relative to the
    distance moved, with the table's bf16 chain bound."""
    shapes = [(12, 20), (20, 12), (12, 12)]
    blocks = [(3, 1), (1, 4), (2, 3)]

    def make():
        gen = torch.Generator().manual_seed(5)
        ps = [nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in shapes]
        return ps, [{"params": [p], "ns_blocks": bl} for p, bl in zip(ps, blocks, strict=True)]

    (p64, g64), (pe, ge), (pf, gf) = make(), make(), make()
    w0 = [p.detach().clone() for p in make()[0]]
    kw = dict(lr=0.02)
    if cls in (TrasMuon,):
        kw.update(clip_period=1, clip_min_cols=2)
    truth = cls(g64, ns_dtype=torch.float64, backend="eager", **kw)
    eager = cls(ge, backend="eager", **kw)
    fused = cls(gf, backend="triton", **kw)
    for name, p, rel in steps_against_float64(truth, eager, fused, p64, pe, pf, w0):
        assert rel < BF16.fro, (cls.__name__, name, tuple(p.shape), rel)


def test_in_out_orientation_blocks_are_in_out_terms():
    """A Conv1D-style (in, out) weight with orientation="in_out" and ns_blocks=(rb, cb) has
    the trajectory of its transpose stored (out, in) with the same ns_blocks."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(12, 20, generator=gen)  # (out, in)
    a, b = nn.Parameter(w.clone()), nn.Parameter(w.t().contiguous())
    oa = TrasMuon([{"params": [a], "ns_blocks": (3, 2)}], lr=0.02, ns_dtype=torch.float64)
    ob = TrasMuon([{"params": [b], "ns_blocks": (3, 2), "orientation": "in_out"}], lr=0.02,
                  ns_dtype=torch.float64)
    for _ in range(3):
        g = torch.randn(12, 20, generator=gen)
        a.grad, b.grad = g.clone(), g.t().contiguous()
        oa.step()
        ob.step()
    torch.testing.assert_close(b.detach().t(), a.detach(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [(0, 1), (2,), (1, 2, 3), "heads", (2.0, 1), (True, 1), None])
def test_bad_values_name_the_key(value):
    p = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="ns_blocks must be a pair"):
        TrasMuon([{"params": [p], "ns_blocks": value}])


@pytest.mark.parametrize("cls", CLASSES)
def test_blocks_that_do_not_divide_are_refused_at_construction(cls):
    p, q = nn.Parameter(torch.randn(8, 12)), nn.Parameter(torch.randn(6, 12))
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0: ns_blocks=\(4, 1\) must divide "
                                         r"the \(d_out, d_in\) = \(6, 12\)"):
        cls([{"params": [p, q], "ns_blocks": (4, 1)}])
    opt = cls([p], lr=0.02)
    with pytest.raises(ValueError, match=r"ns_blocks=\(1, 5\)"):
        opt.add_param_group({"params": [q], "ns_blocks": (1, 5)})
    assert len(opt.param_groups) == 1  # nothing was added


def test_named_parameter_and_in_out_orientation_in_the_error():
    w = nn.Parameter(torch.randn(16, 48))  # Conv1D (in, out): the (out, in) matrix is 48 x 16
    with pytest.raises(ValueError, match=r"'c_attn.weight'.*\(d_out, d_in\) = \(48, 16\)"):
        TrasMuon([{"params": [("c_attn.weight", w)], "ns_blocks": (1, 32), "orientation": "in_out"}])
    TrasMuon([{"params": [("c_attn.weight", w)], "ns_blocks": (12, 1), "orientation": "in_out"}])


def test_a_changed_key_is_refused_before_the_step_changes_anything():
    p = nn.Parameter(torch.randn(8, 12))
    opt = TrasMuon([{"params": [p], "ns_blocks": (2, 1)}], lr=0.02)
    p.grad = torch.randn(8, 12)
    opt.step()
    before = p.detach().clone()
    momentum = opt.state[p]["momentum"].clone()
    opt.param_groups[0]["ns_blocks"] = (3, 1)
    with pytest.raises(ValueError, match=r"ns_blocks=\(3, 1\) must divide"):
        opt.step()
    assert torch.equal(p, before) and torch.equal(opt.state[p]["momentum"], momentum)
    opt.param_groups[0]["ns_blocks"] = [4, 3]  # a list (as a JSON checkpoint gives) works
    opt.step()


def test_stacked_experts_take_blocks_per_expert():
    w = nn.Parameter(torch.randn(3, 8, 12))
    opt = TrasMuon([{"params": [w], "stacked": True, "ns_blocks": (4, 2)}], lr=0.02, ns_dtype=torch.float64)
    w.grad = torch.randn(3, 8, 12)
    opt.step()
    with pytest.raises(ValueError, match=r"\(d_out, d_in\) = \(8, 12\)"):
        TrasMuon([{"params": [w], "stacked": True, "ns_blocks": (3, 1)}])


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_checkpoints_carry_the_key(backend):
    def make():
        ps = params_of([(12, 20), (8, 8)])
        return ps, TrasMuon([{"params": ps[:1], "ns_blocks": (3, 2)}, {"params": ps[1:]}], lr=0.02,
                            backend=backend)

    ps, opt = make()
    gen = torch.Generator().manual_seed(4)
    grads = [grads_for(s, ps, gen) for s in range(1, 5)]
    for g in grads[:2]:
        for p, gr in zip(ps, g, strict=True):
            p.grad = gr.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in ps], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    assert saved["opt"]["param_groups"][0]["ns_blocks"] == (3, 2)
    assert saved["opt"]["param_groups"][1]["ns_blocks"] == (1, 1)
    qs, resumed = make()
    resumed.param_groups[0]["ns_blocks"] = (1, 1)  # the checkpoint's value wins
    with torch.no_grad():
        for q, w in zip(qs, saved["params"], strict=True):
            q.copy_(w)
    resumed.load_state_dict(saved["opt"])
    assert tuple(resumed.param_groups[0]["ns_blocks"]) == (3, 2)
    for g in grads[2:]:
        for p, q, gr in zip(ps, qs, g, strict=True):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        resumed.step()
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p, q)


def test_a_checkpoint_without_the_key_gets_the_default():
    ps = params_of([(12, 20)])
    opt = TrasMuon(ps, lr=0.02)
    ps[0].grad = torch.randn(12, 20)
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["ns_blocks"]
    fresh = TrasMuon(params_of([(12, 20)]), lr=0.02)
    fresh.load_state_dict(sd)
    assert tuple(fresh.param_groups[0]["ns_blocks"]) == (1, 1)


# --------------------------------------------------------------------------------------
# split_params(ns_blocks="heads")
# --------------------------------------------------------------------------------------
def _blocks_by_name(groups):
    out = {}
    for g in groups:
        for name, _ in g["params"]:
            out[name] = (g.get("ns_blocks"), g.get("orientation"))
    return out


def test_split_params_heads_on_a_tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    groups = trasmuon.split_params(model, ns_blocks="heads")
    got = _blocks_by_name(groups)
    for layer in range(2):
        pre = f"model.layers.{layer}.self_attn."
        assert got[pre + "q_proj.weight"] == ((4, 1), None)
        assert got[pre + "k_proj.weight"] == ((2, 1), None)
        assert got[pre + "v_proj.weight"] == ((2, 1), None)
        assert got[pre + "o_proj.weight"] == ((1, 4), None)
        assert got[f"model.layers.{layer}.mlp.up_proj.weight"] == (None, None)
    # the default leaves every matrix whole
    assert all(g.get("ns_blocks") is None for g in trasmuon.split_params(model))
    opt = TrasMuon(groups, lr=0.01)
    model(torch.randint(0, 32, (2, 5))).logits.sum().backward()
    opt.step()


def test_split_params_heads_on_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=4, n_positions=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(cfg)
    groups = trasmuon.split_params(model, ns_blocks="heads")
    got = _blocks_by_name(groups)
    # c_attn is stored (16, 48): its (out, in) matrix is 48 x 16, q, k and v of 4 heads each
    assert got["transformer.h.0.attn.c_attn.weight"] == ((12, 1), "in_out")
    assert got["transformer.h.0.attn.c_proj.weight"] == ((1, 4), "in_out")
    assert got["transformer.h.0.mlp.c_proj.weight"] == (None, "in_out")
    assert got["transformer.h.0.mlp.c_fc.weight"] == (None, "in_out")
    opt = TrasMuon(groups, lr=0.01)
    model(torch.randint(0, 32, (2, 5))).logits.sum().backward()
    opt.step()


def test_split_params_heads_on_torchtitan_style_attention():
    class Attention(nn.Module):
        def __init__(self, fused: bool) -> None:
            super().__init__()
            self.n_heads, self.n_kv_heads, self.head_dim = 4, 2, 4
            if fused:
                self.wqkv = nn.Linear(16, 32, bias=False)
            else:
                self.wq, self.wk, self.wv = (nn.Linear(16, n, bias=False) for n in (16, 8, 8))
            self.wo = nn.Linear(16, 16, bias=False)

    model = nn.ModuleDict({"a": Attention(False), "b": Attention(True), "ffn": nn.Linear(16, 16)})
    got = _blocks_by_name(trasmuon.split_params(model, ns_blocks="heads"))
    assert got["a.wq.weight"] == ((4, 1), None)
    assert got["a.wk.weight"] == got["a.wv.weight"] == ((2, 1), None)
    assert got["a.wo.weight"] == got["b.wo.weight"] == ((1, 4), None)
    assert got["b.wqkv.weight"] == ((8, 1), None)
    assert got["ffn.weight"] == (None, None)


def test_split_params_heads_errors():
    with pytest.raises(ValueError, match="no attention projection"):
        trasmuon.split_params(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), ns_blocks="heads")
    with pytest.raises(ValueError, match="ns_blocks must be None or one of"):
        trasmuon.split_params(nn.Linear(8, 8), ns_blocks="rows")


# --------------------------------------------------------------------------------------
# Distributed: owners orthogonalize the reassembled matrices block by block
# --------------------------------------------------------------------------------------
def _fsdp_blocks_worker(rank: int, world: int, tmp: str) -> None:
    import copy

    from .test_distributed import Net, _fully_shard, full, train_step, write_report

    def groups(model):
        named = dict(model.named_parameters())
        return [
            {"params": [named["fc1.weight"]], "ns_blocks": (4, 2)},        # 32 x 16, row-sharded
            {"params": [named["fc2.weight"]], "ns_blocks": (3, 4)},        # 24 x 32
            {"params": [named["fc3.weight"], named["side.weight"]], "ns_blocks": (1, 8)},
            {"params": [named["extra"]], "ns_blocks": (2, 5)},             # unsharded
            {"params": [named[k] for k in ("proj.weight", "tiny.weight")]},
            {"params": [named[k] for k in ("emb.weight", "fc1.bias", "head.weight", "head.bias")],
             "rule": "adamw"},
        ]

    worst = {}
    for backend, kw in (("eager", dict(ns_dtype=torch.float64)), ("triton", dict(ns_steps=3))):
        torch.manual_seed(0)
        ref_model = Net()
        model = _fully_shard(copy.deepcopy(ref_model), world)
        hp = dict(lr=0.02, weight_decay=0.1, clip_period=1, backend=backend, **kw)
        opt, ref_opt = TrasMuon(groups(model), **hp), TrasMuon(groups(ref_model), **hp)
        worst[backend] = 0.0
        for step in range(1, 4):
            train_step(model, model, opt, step, rank, world, False, (ref_model, ref_opt))
            for (name, p), rp in zip(model.named_parameters(), ref_model.parameters(), strict=True):
                rel = float((full(p).detach() - rp.detach()).norm() / rp.detach().norm())
                worst[backend] = max(worst[backend], rel)
                assert rel < 1e-5, (backend, step, name, rel)
    write_report(tmp, worst)


def test_fsdp2_with_blocks_matches_one_process(tmp_path):
    """FSDP2 on 2 ranks (gloo): the owners orthogonalize the reassembled matrices with their
    ns_blocks on both backends; the weights follow the single-process run."""
    from .test_distributed import read_report, run_workers

    run_workers(_fsdp_blocks_worker, 2, tmp_path)
    print("\nns_blocks under FSDP2, 2 ranks: worst relative weight difference", read_report(tmp_path))

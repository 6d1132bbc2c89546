"""Matrices stored (in_features, out_features), as transformers' Conv1D stores them, take the
rule of their (out, in) matrix: the row normalization acts on output features and the column
gate on input features whichever way the weight is stored (docs/usage.md, "Orientation")."""

import pytest
import torch
from torch import nn

from trasmuon import Muon, NorMuon, TrasMuon, split_params

MATRIX_CLASSES = (TrasMuon, NorMuon, Muon)


def bursty_grads(steps, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        g = torch.randn(shape, dtype=torch.float64, generator=gen)
        if t % 3 == 1:
            g[:, 2] *= 40.0  # a burst on input feature 2
        out.append(g)
    return out


@pytest.mark.parametrize("cls", MATRIX_CLASSES)
def test_an_in_out_matrix_takes_the_rule_of_its_transpose(cls):
    d_out, d_in = 24, 10
    torch.manual_seed(0)
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    linear = nn.Parameter(w.clone())  # (out, in), as nn.Linear stores it
    conv = nn.Parameter(w.mT.contiguous())  # (in, out), as Conv1D stores it
    kw = dict(lr=0.02, weight_decay=0.1, ns_dtype=torch.float64, backend="eager")
    if cls is TrasMuon:
        kw.update(clip_period=1)
    if cls is Muon:
        kw.update(adjust_lr_fn="original")  # reads the shape: sqrt(max(1, d_out / d_in))
    ref_opt = cls([linear], **kw)
    opt = cls([{"params": [conv], "orientation": "in_out"}], **kw)
    wrong = nn.Parameter(w.mT.contiguous())
    wrong_opt = cls([wrong], **kw)  # the old behaviour: the rule on the stored (in, out) matrix
    for g in bursty_grads(8, (d_out, d_in)):
        linear.grad, conv.grad, wrong.grad = g.clone(), g.mT.contiguous(), g.mT.contiguous()
        ref_opt.step()
        opt.step()
        wrong_opt.step()
    torch.testing.assert_close(conv.detach().mT, linear.detach(), rtol=1e-10, atol=1e-12)
    assert (wrong.detach().mT - linear.detach()).abs().max() > 1e-3  # the orientation matters
    state, ref_state = opt.state[conv], ref_opt.state[linear]
    assert state["momentum"].shape == (d_in, d_out)  # stored like the parameter
    torch.testing.assert_close(state["momentum"].mT, ref_state["momentum"], rtol=0, atol=0)
    for key in ("row_v", "c_ema", "energy_ref", "c_last"):
        if key in ref_state:
            assert state[key].shape == ref_state[key].shape, key
            torch.testing.assert_close(state[key], ref_state[key], rtol=1e-10, atol=1e-12)
    if cls is TrasMuon:
        assert state["c_ema"].shape == (d_in,) and float(state["c_ema"][2]) < 1.0  # gated


def test_bad_orientation_is_refused_by_name():
    with pytest.raises(ValueError, match="orientation"):
        TrasMuon([{"params": [nn.Parameter(torch.randn(4, 4))], "orientation": "in-out"}])


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers is part of the test extra")


def test_hf_gpt2_conv1d_weights_get_the_in_out_orientation(transformers):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    groups = split_params(model)
    assert [g.get("orientation", "out_in") for g in groups] == ["in_out", "out_in", "out_in"]
    assert groups[1]["rule"] == groups[2]["rule"] == "adamw"
    assert groups[2]["weight_decay"] == 0.0  # biases and norm gains
    names = [n for n, _ in groups[0]["params"]]
    assert len(names) == 8 and all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
                                   for n in names)
    assert "transformer.wte.weight" in [n for n, _ in groups[1]["params"]]  # tied head: AdamW
    opt = TrasMuon(groups, lr=0.02, backend="eager", clip_min_cols=8)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 64, (4, 16), generator=gen)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    c_attn = model.transformer.h[0].attn.c_attn.weight  # (in 32, out 96)
    state = opt.state[c_attn]
    assert state["row_v"].shape == (96,) and state["c_ema"].shape == (32,)


def test_nn_linear_models_keep_the_out_in_orientation(transformers):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                   max_position_embeddings=16, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    groups = split_params(model)
    assert [g.get("orientation", "out_in") for g in groups] == ["out_in", "out_in", "out_in"]
    mlp = model.model.layers[0].mlp.down_proj.weight  # (out 32, in 64)
    assert any(p is mlp for _, p in groups[0]["params"])
    opt = TrasMuon(groups, lr=0.01, backend="eager")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[mlp]["row_v"].shape == (32,) and opt.state[mlp]["c_ema"].shape == (64,)

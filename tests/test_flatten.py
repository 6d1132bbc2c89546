"""``flatten=True``: an (out, in, *kernel) weight as the (out, in * prod(kernel)) matrix, on
both backends, against the same matrix stored 2D (bitwise: the same arithmetic on the same
memory); ``split_params`` routing of convolution weights; what is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trasmuon
from trasmuon import NAMO, NAMOD, Muon, NorMuon, TrasMuon

GATED = dict(warmup_steps=1, clip_period=1, clip_min_cols=2)
CASES = [(TrasMuon, GATED), (TrasMuon, dict(GATED, energy_source="update")), (NorMuon, {}),
         (Muon, {}), (NAMO, {}), (NAMOD, dict(clamp=0.5))]


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("cls,kw", CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_flattened_weight_is_its_matrix(cls, kw, backend):
    torch.manual_seed(0)
    w = torch.randn(6, 3, 2, 2)
    conv, flat = nn.Parameter(w.clone()), nn.Parameter(w.reshape(6, 12).clone())
    opt = cls([{"params": [conv], "flatten": True}], lr=0.02, backend=backend, **kw)
    ref = cls([{"params": [flat]}], lr=0.02, backend=backend, **kw)
    for _ in range(4):
        g = torch.randn(6, 12)
        g[:, :2] *= 20.0  # a burst on two columns (the gate's target)
        conv.grad, flat.grad = g.reshape(6, 3, 2, 2).clone(), g.clone()
        opt.step()
        ref.step()
    assert all(b.backend == backend for b in opt._plan.buckets)
    assert torch.equal(conv.detach().reshape(6, 12), flat.detach())
    state, ref_state = opt.state[conv], ref.state[flat]
    assert set(state) == set(ref_state) and state["momentum"].shape == conv.shape
    for key, value in state.items():
        assert torch.equal(value.reshape(ref_state[key].shape), ref_state[key]), key
    # A checkpoint round trip keeps the parameter's shape for per-element state.
    again = cls([{"params": [conv], "flatten": True}], lr=0.02, backend=backend, **kw)
    again.load_state_dict(opt.state_dict())
    assert again.state[conv]["momentum"].shape == conv.shape


def test_a_group_without_rule_sends_flattened_weights_to_the_matrix_rule():
    conv = nn.Parameter(torch.randn(4, 3, 2))
    opt = TrasMuon([{"params": [conv], "flatten": True}, {"params": [nn.Parameter(torch.randn(4, 3, 2))]}])
    assert opt.rule_of(opt.param_groups[0], conv) == "trasmuon"
    assert opt.rule_of(opt.param_groups[1], opt.param_groups[1]["params"][0]) == "adamw"


def test_refused():
    w = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="flatten=True in its group"):
        TrasMuon([{"params": [nn.Parameter(w.clone())], "rule": "trasmuon"}])
    with pytest.raises(ValueError, match="orientation='in_out'"):
        TrasMuon([{"params": [nn.Parameter(w.clone())], "flatten": True, "orientation": "in_out"}])
    last = nn.Parameter(w.clone().to(memory_format=torch.channels_last))
    with pytest.raises(ValueError, match="channels_last"):
        TrasMuon([{"params": [last], "flatten": True}])
    with pytest.raises(ValueError, match="flatten must be a bool"):
        TrasMuon([{"params": [nn.Parameter(w.clone())], "flatten": 1}])


def test_split_params_routes_convolution_weights():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 2), nn.Flatten(),
                          nn.Linear(16, 10), nn.Linear(10, 5))
    model[2].weight.data = model[2].weight.data.contiguous()
    groups = {tuple(n for n, _ in g["params"]): g for g in trasmuon.split_params(model, head=None)}
    flat = next(g for g in groups.values() if g.get("flatten"))
    assert [n for n, _ in flat["params"]] == ["0.weight", "2.weight"]
    assert flat["rule"] is None
    model[0].weight.data = model[0].weight.data.to(memory_format=torch.channels_last)
    groups = trasmuon.split_params(model, head=None)
    adamw = next(g for g in groups if g["rule"] == "adamw")
    assert "0.weight" in [n for n, _ in adamw["params"]]  # cannot be viewed as a matrix
    TrasMuon(groups)  # and the optimizer takes the groups as they are

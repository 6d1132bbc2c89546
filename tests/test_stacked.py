"""``stacked=True``: an (E, out, in) expert stack is E independent matrices, every per-matrix
quantity kept per expert, against E separate 2D parameters given the same gradients (bitwise
on both backends: the same arithmetic, matrix by matrix); checkpoints, diagnostics, and what
is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trasmuon import NAMO, NAMOD, Muon, NorMuon, TrasMuon

GATED = dict(warmup_steps=1, clip_period=1, clip_min_cols=2)
CASES = [(TrasMuon, GATED), (TrasMuon, dict(GATED, energy_source="update")), (NorMuon, {}),
         (Muon, {}), (NAMO, {}), (NAMOD, dict(clamp=0.5))]
E, OUT, IN = 3, 5, 7


# Every rule both ways round on the eager backend. On the (interpreted, slow) Triton backend,
# the programs that keep per-expert state differently: TrasMuon's (gate state, energy_ref
# created at the first gated step; both energy sources), both ways round, and NAMO-D's (the
# NAMO program); NorMuon runs TrasMuon's program without the gate, and Muon's program keeps
# only the momentum, stored like the weight.
MATRIX = ([(c, k, "eager", o) for c, k in CASES for o in ("out_in", "in_out")]
          + [(c, k, "triton", "out_in") for c, k in CASES if c in (TrasMuon, NAMOD)]
          + [(TrasMuon, GATED, "triton", "in_out")])


@pytest.mark.parametrize("cls,kw,backend,orientation", MATRIX,
                         ids=lambda c: getattr(c, "__name__", c if isinstance(c, str) else ""))
def test_a_stack_is_its_experts(cls, kw, backend, orientation):
    torch.manual_seed(0)
    w = torch.randn(E, OUT, IN)
    stored = w if orientation == "out_in" else w.mT.contiguous()  # (E, in, out)
    stack = nn.Parameter(stored.clone())
    experts = [nn.Parameter(stored[e].clone()) for e in range(E)]
    opt = cls([{"params": [stack], "stacked": True, "orientation": orientation}], lr=0.02,
              backend=backend, diagnostics=True, **kw)
    ref = cls([{"params": experts, "orientation": orientation}], lr=0.02, backend=backend,
              diagnostics=True, **kw)
    for _ in range(4):
        g = torch.randn(E, OUT, IN)
        g[:, :, :2] *= 20.0  # a burst on two input columns of every expert (the gate's target)
        g = g if orientation == "out_in" else g.mT.contiguous()
        stack.grad = g.clone()
        for e, p in enumerate(experts):
            p.grad = g[e].clone()
        opt.step()
        ref.step()
    assert all(b.backend == backend for b in opt._plan.buckets)
    for e, p in enumerate(experts):
        assert torch.equal(stack.detach()[e], p.detach()), e
        for key, value in ref.state[p].items():
            mine = opt.state[stack][key]
            assert torch.equal(mine if key in ("step", "momentum") and mine.ndim == value.ndim
                               else mine[e], value), (e, key)
    diag, ref_diag = opt.diagnostics(), ref.diagnostics()
    assert [diag[f"group0.param0[{e}]"] for e in range(E)] == [ref_diag[f"group0.param{e}"] for e in range(E)]
    # A checkpoint round trip, and the step continues bitwise.
    again = cls([{"params": [stack], "stacked": True, "orientation": orientation}], lr=0.02,
                backend=backend, **kw)
    again.load_state_dict(opt.state_dict())
    assert again.state[stack]["momentum"].shape == stack.shape


def test_refused():
    with pytest.raises(ValueError, match="stacked=True takes"):
        TrasMuon([{"params": [nn.Parameter(torch.randn(4, 3))], "stacked": True}])
    with pytest.raises(ValueError, match="stacked=True takes"):
        TrasMuon([{"params": [nn.Parameter(torch.randn(2, 4, 3, 2))], "stacked": True,
                   "rule": "trasmuon"}])
    with pytest.raises(ValueError, match="stacked=True"):
        TrasMuon([{"params": [nn.Parameter(torch.randn(2, 4, 3))], "rule": "trasmuon"}])
    # Without the key, a 3-D param in a group that names no rule takes AdamW, as before.
    opt = TrasMuon([nn.Parameter(torch.randn(2, 4, 3))])
    assert opt.rule_of(opt.param_groups[0], opt.param_groups[0]["params"][0]) == "adamw"


def test_split_params_routes_grouped_experts():
    import trasmuon

    class GroupedExperts(nn.Module):  # torchtitan's names: 0.3 and later, and before
        def __init__(self) -> None:
            super().__init__()
            self.w1_EFD = nn.Parameter(torch.randn(4, 6, 5))
            self.w2 = nn.Parameter(torch.randn(4, 6, 5))

    model = nn.Sequential(nn.Linear(5, 5), GroupedExperts())
    groups = trasmuon.split_params(model, head=None)
    stacked = {g["orientation"]: [n for n, _ in g["params"]] for g in groups if g.get("stacked")}
    assert stacked == {"out_in": ["1.w1_EFD"], "in_out": ["1.w2"]}
    TrasMuon(groups)

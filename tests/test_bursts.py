"""trasmuon.bursts.ColumnBurst: exact momentum bursts, seeding, untouched columns and params."""

import pytest
import torch
from torch import nn

import trasmuon
from trasmuon.bursts import BurstEvent, ColumnBurst, burst_matrix_


class Net(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 10, bias=False)
        self.head = nn.Linear(10, 3)
        self.to(dtype)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def backward(model, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = model.fc1.weight.dtype
    x = torch.randn(16, 6, generator=gen, dtype=dtype)
    y = torch.randn(16, 3, generator=gen, dtype=dtype)
    ((model(x) - y) ** 2).mean().backward()


def make(cls=trasmuon.TrasMuon, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = Net(dtype)
    opt = cls(trasmuon.split_params(model), lr=0.02, **kw)
    return model, opt


def beta1(opt):
    """The momentum coefficient of the first group: Muon's ``momentum``, else ``betas[0]``."""
    group = opt.param_groups[0]
    return group["momentum"] if "momentum" in group else group["betas"][0]


class GradSpy:
    """A step pre-hook registered after the injector: sees the gradients the step uses."""

    def __init__(self, opt):
        self.grads = []
        opt.register_step_pre_hook(self)

    def __call__(self, opt, args, kwargs):
        self.grads.append({id(p): p.grad.detach().clone() for g in opt.param_groups
                           for p in g["params"] if p.grad is not None})


# ------------------------------------------------------------------------------------------
# The momentum burst is exactly M_t[:, J] = s * (b1 M_{t-1} + (1 - b1) G)[:, J]
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("burst_step", [1, 3])  # 1: the momentum does not exist yet
@pytest.mark.parametrize("cls", [trasmuon.TrasMuon, trasmuon.NorMuon, trasmuon.Muon])
def test_momentum_burst_identity_is_exact(cls, burst_step):
    model, opt = make(cls)
    ref_model, ref_opt = make(cls)
    bursts = ColumnBurst(opt, every=100, start=burst_step, scale=7.0, n_cols=3, seed=1)
    b1 = beta1(opt)
    for step in range(1, burst_step + 1):
        for m in (model, ref_model):
            backward(m, step)
        before = {p: opt.state[p]["momentum"].clone() if "momentum" in opt.state[p]
                  else torch.zeros_like(p) for p in (model.fc1.weight, model.fc2.weight)}
        grads = {p: p.grad.clone() for p in (model.fc1.weight, model.fc2.weight)}
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    events = bursts.events_at(burst_step)
    assert [e.param for e in events] == ["fc1.weight", "fc2.weight"]
    for event, p in zip(events, (model.fc1.weight, model.fc2.weight), strict=True):
        expected = b1 * before[p] + (1 - b1) * grads[p]
        cols = list(event.columns)
        expected[:, cols] *= 7.0
        torch.testing.assert_close(opt.state[p]["momentum"], expected, rtol=1e-13, atol=1e-15)
        assert len(cols) == 3 and event.step == burst_step == int(opt.state[p]["step"])
    # Before the burst step the two runs were identical; the burst changed the weights.
    assert not torch.equal(model.fc1.weight, ref_model.fc1.weight)


def test_momentum_burst_in_a_random_basis_is_exact():
    model, opt = make(trasmuon.NorMuon)
    bursts = ColumnBurst(opt, every=2, scale=0.1, n_cols=2, basis="random", redraw=True, seed=3)
    b1 = beta1(opt)
    p = model.fc2.weight
    for step in (1, 2):
        backward(model, step)
        before = opt.state[p]["momentum"].clone() if "momentum" in opt.state[p] else torch.zeros_like(p)
        grad = p.grad.clone()
        opt.step()
        opt.zero_grad()
    (event,) = [e for e in bursts.events_at(2) if e.param == "fc2.weight"]
    q = event.directions.double()
    assert event.columns == () and q.shape == (12, 2)
    torch.testing.assert_close(q.T @ q, torch.eye(2, dtype=torch.float64), atol=1e-6, rtol=0)
    plain = b1 * before + (1 - b1) * grad
    expected = plain + (0.1 - 1.0) * (plain @ q) @ q.T
    torch.testing.assert_close(opt.state[p]["momentum"], expected, rtol=1e-6, atol=1e-9)


def test_momentum_burst_scales_sgd_momentum_buffer():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 8, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    bursts = ColumnBurst(opt, every=2, scale=4.0, n_cols=2, seed=0)
    for step in (1, 2):
        w.grad = torch.randn(5, 8, dtype=torch.float64)
        before = opt.state[w]["momentum_buffer"].clone() if step == 2 else None
        grad = w.grad.clone()
        opt.step()
    cols = list(bursts.events_at(2)[0].columns)
    expected = 0.9 * before + grad
    expected[:, cols] *= 4.0
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], expected, rtol=1e-14, atol=0)


# ------------------------------------------------------------------------------------------
# Which columns and which params
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["grad", "grad_add", "momentum"])
def test_only_burst_columns_of_matrix_params_change(mode):
    model, opt = make(trasmuon.TrasMuon, dtype=torch.float32)
    bursts = ColumnBurst(opt, every=1, scale=3.0, frac=0.25, mode=mode, seed=0)
    spy = GradSpy(opt)
    backward(model, 0)
    original = {id(p): p.grad.clone() for p in model.parameters()}
    opt.step()
    seen = spy.grads[0]
    by_name = {e.param: e for e in bursts.events}
    assert set(by_name) == {"fc1.weight", "fc2.weight"}
    for name, p in model.named_parameters():
        before, after = original[id(p)], seen[id(p)]
        if name not in by_name:  # biases and the head (AdamW): untouched
            assert torch.equal(before, after), name
            continue
        cols = list(by_name[name].columns)
        assert len(cols) == max(1, round(0.25 * p.shape[1]))
        rest = [j for j in range(p.shape[1]) if j not in cols]
        assert torch.equal(before[:, rest], after[:, rest]), name
        if mode == "grad_add":
            assert not torch.equal(before[:, cols], after[:, cols])
        else:
            assert torch.equal(before[:, cols] * 3.0, after[:, cols])


def test_non_matrix_params_only_when_asked():
    model, opt = make(trasmuon.TrasMuon, dtype=torch.float32)
    with pytest.raises(ValueError, match="include_non_matrix"):
        ColumnBurst(opt, [model.fc1.bias], every=1)
    bursts = ColumnBurst(opt, every=1, scale=2.0, include_non_matrix=True, seed=0)
    spy = GradSpy(opt)
    backward(model, 0)
    bias_grad = model.fc1.bias.grad.clone()
    opt.step()
    names = {e.param for e in bursts.events}
    assert names == {n for n, _ in model.named_parameters()}
    (event,) = [e for e in bursts.events if e.param == "fc1.bias"]
    after = spy.grads[0][id(model.fc1.bias)]
    cols = list(event.columns)
    assert torch.equal(after[cols], bias_grad[cols] * 2.0)
    rest = [j for j in range(12) if j not in cols]
    assert torch.equal(after[rest], bias_grad[rest])


def test_explicit_matrix_params_under_adamw():
    torch.manual_seed(0)
    model = Net(torch.float32)
    opt = trasmuon.AdamW(trasmuon.split_params(model), lr=1e-3)
    assert ColumnBurst(opt, every=1).params == []  # no matrix rule: nothing by default
    bursts = ColumnBurst(opt, [model.fc1.weight, model.fc2.weight], every=1, mode="grad")
    backward(model, 0)
    opt.step()
    assert [e.param for e in bursts.events] == ["fc1.weight", "fc2.weight"]


# ------------------------------------------------------------------------------------------
# Seeding, schedule, logging
# ------------------------------------------------------------------------------------------
def train_with_bursts(seed, steps=9, **kw):
    model, opt = make(trasmuon.TrasMuon, dtype=torch.float32, diagnostics=True)
    bursts = ColumnBurst(opt, every=3, scale=5.0, n_cols=2, seed=seed, **kw)
    for step in range(1, steps + 1):
        backward(model, step)
        opt.step()
        opt.zero_grad()
    return model, bursts


def test_same_seed_same_bursts_and_weights_other_seed_differs():
    m1, b1 = train_with_bursts(0, redraw=True)
    m2, b2 = train_with_bursts(0, redraw=True)
    _, b3 = train_with_bursts(1, redraw=True)
    assert b1.events == b2.events
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [e.columns for e in b1.events] != [e.columns for e in b3.events]


def test_schedule_redraw_and_step_numbering():
    _, fixed = train_with_bursts(0, steps=10)
    assert fixed.burst_steps == [3, 6, 9] and fixed.step == 10
    per_param = {}
    for e in fixed.events:
        per_param.setdefault(e.param, set()).add(e.columns)
        assert isinstance(e, BurstEvent) and e.mode == "momentum" and e.shape[1] in (6, 12)
    assert all(len(cols) == 1 for cols in per_param.values())  # drawn once, reused
    _, redrawn = train_with_bursts(0, steps=10, redraw=True)
    cols = [e.columns for e in redrawn.events if e.param == "fc2.weight"]
    assert len(set(cols)) > 1
    _, windowed = train_with_bursts(0, steps=12, start=2, stop=8)
    assert windowed.burst_steps == [2, 5, 8]
    assert windowed.events[0].to_dict()["step"] == 2


def test_numbering_continues_from_optimizer_state_and_remove_stops():
    model, opt = make(trasmuon.TrasMuon, dtype=torch.float32)
    for step in (1, 2):
        backward(model, step)
        opt.step()
        opt.zero_grad()
    with ColumnBurst(opt, every=3, seed=0) as bursts:
        assert bursts.step == 2
        backward(model, 3)
        opt.step()
        assert bursts.burst_steps == [3] and bursts.events_at(3)[0].step == int(opt.state[model.fc1.weight]["step"])
    for step in range(4, 8):
        backward(model, step)
        opt.step()
        opt.zero_grad()
    assert bursts.burst_steps == [3]  # removed on exit


def test_closure_and_bad_arguments_raise():
    model, opt = make(trasmuon.TrasMuon, dtype=torch.float32)
    ColumnBurst(opt, every=1)

    def closure():
        opt.zero_grad()
        backward(model, 0)
        return torch.tensor(0.0)

    with pytest.raises(RuntimeError, match="closure"):
        opt.step(closure)
    for kw in (dict(every=0), dict(every=1, mode="x"), dict(every=1, basis="x"),
               dict(every=1, scale=0.0), dict(every=1, n_cols=1, frac=0.5),
               dict(every=1, frac=1.5), dict(every=2, start=3, stop=1)):
        with pytest.raises(ValueError):
            ColumnBurst(opt, **kw)


def test_burst_matrix_helper():
    x = torch.arange(12.0).reshape(3, 4)
    y = x.clone()
    burst_matrix_(y, 2.0, columns=torch.tensor([1, 3]))
    assert torch.equal(y[:, [0, 2]], x[:, [0, 2]]) and torch.equal(y[:, [1, 3]], 2 * x[:, [1, 3]])
    z = x.clone()
    burst_matrix_(z, 2.0, directions=torch.eye(4)[:, [1, 3]])
    assert torch.equal(z, y)
    with pytest.raises(ValueError):
        burst_matrix_(x, 2.0)

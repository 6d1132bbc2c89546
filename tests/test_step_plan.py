"""The step plan: built once, reused while nothing it depends on changes, rebuilt (never stale)
when something does; on the Triton backend two consecutive steps issue the same launches with
the same arguments, lr and the step counters being read from device memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import trasmuon
from trasmuon_kernels._launch import record_launches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(12, 20), (12, 20), (20, 12), (7,), (3, 5)]
    return [nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, dtype)) for s in shapes]


def set_grads(params, step, *, in_place=True):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        g = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
        if in_place and p.grad is not None:
            p.grad.copy_(g)
        else:
            p.grad = g


@pytest.mark.parametrize("cls", [trasmuon.TrasMuon, trasmuon.Muon, trasmuon.NAMOD])
def test_two_steps_issue_identical_launches_across_an_lr_change(cls):
    params = make_params()
    opt = cls([{"params": params[:3]}, {"params": params[3:], "rule": "adamw"}], lr=0.01,
              backend="triton")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(1, 3):
        set_grads(params, step)
        opt.step()
        sched.step()
    lists = []
    for step in range(3, 5):
        set_grads(params, step)  # the same gradient tensors, new values
        with record_launches() as records:
            opt.step()
        sched.step()  # lr changes between the two steps
        lists.append(records)
    assert lists[0] == lists[1]
    names = [r.name for r in lists[0]]
    assert "torch:copy(lr)" in names and "torch:add(step)" in names
    plan = opt._plan
    # The device copy holds the lr of the last step (written when a step begins).
    assert float(plan.devices.lr[params[0].device][0]) == pytest.approx(0.01 * 0.5**3)


def test_gradients_that_move_refresh_the_tables_not_the_launches():
    params = make_params()
    opt = trasmuon.TrasMuon(params, lr=0.01, backend="triton")
    set_grads(params, 1, in_place=False)
    opt.step()
    plan = opt._plan
    kernels = []
    for step in (2, 3):
        keep = [p.grad for p in params]  # new gradients at new addresses
        set_grads(params, step, in_place=False)
        with record_launches() as records:
            opt.step()
        del keep
        assert opt._plan is plan
        assert any("pointer table" in r.name or "grad addresses" in r.name for r in records)
        kernels.append([r for r in records if not r.name.startswith("torch:")])
    assert kernels[0] == kernels[1]


def test_the_plan_is_rebuilt_when_what_it_depends_on_changes():
    params = make_params()
    opt = trasmuon.TrasMuon(params, lr=0.01, backend="eager")
    set_grads(params, 1)
    opt.step()
    plan = opt._plan
    set_grads(params, 2)
    opt.step()
    assert opt._plan is plan  # nothing changed
    opt.param_groups[0]["weight_decay"] = 0.1
    opt.step()
    assert opt._plan is not plan
    plan = opt._plan
    params[1].grad = None  # a param without a gradient this step
    opt.step()
    assert opt._plan is not plan
    assert not any(q is params[1] for b in opt._plan.buckets for q in b.params)
    plan = opt._plan
    opt.load_state_dict(opt.state_dict())
    set_grads(params, 3, in_place=False)
    opt.step()
    assert opt._plan is not plan
    plan = opt._plan
    extra = nn.Parameter(torch.randn(4, 6, device=DEVICE))
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.randn_like(extra)
    opt.step()
    assert opt._plan is not plan
    assert any(q is extra for b in opt._plan.buckets for q in b.params)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_a_rebuilt_plan_keeps_the_state_and_the_results(backend):
    """Rebuilding the plan (here at every step, by dropping it) gives the same results as
    keeping it: state lives in optimizer.state."""
    def run(rebuild):
        params = make_params(seed=3)
        opt = trasmuon.TrasMuon(params, lr=0.01, backend=backend, clip_period=1)
        for step in range(1, 6):
            set_grads(params, step)
            if rebuild:
                opt._plan = None
            opt.step()
        return params, opt

    a, opt_a = run(False)
    b, opt_b = run(True)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
    for p, q in zip(a, b, strict=True):
        for key, value in opt_a.state[p].items():
            assert torch.equal(value.cpu(), opt_b.state[q][key].cpu()), key


def test_tensor_lr_is_copied_on_the_device_and_changes_are_seen():
    params = make_params()
    lr = torch.tensor(0.01, device=DEVICE)
    opt = trasmuon.TrasMuon(params, lr=lr, backend="triton")
    ref_params = [copy.deepcopy(p) for p in params]
    ref = trasmuon.TrasMuon(ref_params, lr=0.01, backend="triton")
    for step in range(1, 4):
        set_grads(params, step)
        set_grads(ref_params, step)
        opt.step()
        ref.step()
        lr.fill_(lr.item() * 0.5)  # a scheduler updating a tensor lr in place
        ref.param_groups[0]["lr"] *= 0.5
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_capture_and_replay_on_a_gpu():  # pragma: no cover - GPU only
    params = make_params()
    lr = torch.tensor(0.01, device="cuda")
    opt = trasmuon.TrasMuon(params, lr=lr, backend="triton")
    set_grads(params, 1)
    opt.step()
    opt.step()  # warm: the plan is built, every kernel compiled
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    ref_params = [p.detach().clone() for p in params]
    graph.replay()
    torch.cuda.synchronize()
    assert not all(torch.equal(p, q) for p, q in zip(params, ref_params, strict=True))

"""Bad input is refused by name before anything changes: gradients that do not fit their
parameters, checkpoints that would break the next step, duplicate parameters, tensor lrs,
out-of-range hyperparameters, and keys a group's rule does not read (docs/usage.md,
"What a step checks"). Each case snapshots every weight and state tensor before the step
and compares them bit for bit after."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import trasmuon
from trasmuon import NAMO, NAMOD, AdamW, Muon, NorMuon, TrasMuon

CLASSES = (TrasMuon, NorMuon, Muon, NAMO, NAMOD, AdamW)
BACKENDS = ("eager", "triton")


def make(cls, backend="eager", **kwargs):
    """A (6, 10) matrix, a (10,) vector and a (3, 4) matrix, one good step taken."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(10)),
              nn.Parameter(torch.randn(3, 4))]
    opt = cls(params, lr=0.01, backend=backend, **kwargs)
    set_grads(params, 1)
    opt.step()
    set_grads(params, 2)
    return params, opt


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def snapshot(params, opt):
    out = {f"param{i}": p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            out[f"param{i}.{key}"] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return out


def assert_unchanged(before, params, opt):
    after = snapshot(params, opt)
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


# ------------------------------------------------------------------------------------------
# Gradients that do not fit their parameter
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("fault", ["shape_same_strides", "shape", "dtype"])
def test_a_gradient_that_does_not_fit_is_refused_before_anything_changes(cls, backend, fault):
    params, opt = make(cls, backend)
    before = snapshot(params, opt)
    if fault == "shape_same_strides":  # the strides of a (3, 10) grad equal a (6, 10) one's
        params[0].grad.data = torch.randn(3, 10)
    elif fault == "shape":
        params[0].grad.data = torch.randn(6, 9)
    else:
        params[2].grad.data = params[2].grad.data.double()
    with pytest.raises(RuntimeError, match=r"parameter \d of param group 0 is a .*its gradient"):
        opt.step()
    assert_unchanged(before, params, opt)


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------
def _spoil(state_dict, key, value):
    sd = copy.deepcopy(state_dict)
    entry = sd["state"][0]
    if callable(value):
        entry[key] = value(entry[key])
    else:
        entry[key] = value
    return sd


def _momentum_key(cls):
    return "exp_avg" if cls is AdamW else "momentum"


SPOILED = {
    "nan_momentum": (lambda m: m.index_fill(0, torch.tensor([1]), float("nan")), "NaN or Inf"),
    "inf_momentum": (lambda m: m.index_fill(0, torch.tensor([1]), float("inf")), "NaN or Inf"),
    "int_momentum": (lambda m: m.to(torch.int32), "dtype torch.int32"),
    "float_momentum": (lambda m: 0.5, "is a float, not a tensor"),
    "nan_step": ("step", float("nan")),
    "negative_step": ("step", -3.0),
    "fractional_step": ("step", 2.5),
    "list_step": ("step", [1.0]),
}


# The check runs at load, before any backend is involved; the step after it runs on both.
LOAD_CASES = [(cls, "eager") for cls in CLASSES] + [(TrasMuon, "triton"), (AdamW, "triton")]


@pytest.mark.parametrize(("cls", "backend"), LOAD_CASES)
@pytest.mark.parametrize("case", sorted(SPOILED))
def test_a_checkpoint_that_would_break_the_next_step_is_refused_at_load(cls, backend, case):
    params, opt = make(cls, backend)
    saved = opt.state_dict()
    fault, expected = SPOILED[case]
    if fault == "step":
        value = expected
        bad = _spoil(saved, "step", torch.tensor(value) if isinstance(value, float) else value)
        pattern = "state 'step' of parameter 0 of param group 0 must be"
    else:
        bad = _spoil(saved, _momentum_key(cls), fault)
        pattern = f"state '{_momentum_key(cls)}' of parameter 0 of param group 0 .*{expected}"
    before = snapshot(params, opt)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                                   for g in opt.param_groups])
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(bad)
    assert_unchanged(before, params, opt)
    assert groups_before == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.step()  # the optimizer is still usable


@pytest.mark.parametrize("cls", [TrasMuon, NorMuon, NAMOD, AdamW])
def test_a_negative_mean_of_squares_is_refused_at_load(cls):
    _, opt = make(cls)
    key = {TrasMuon: "row_v", NorMuon: "row_v", NAMOD: "col_grad_sq_avg", AdamW: "exp_avg_sq"}[cls]
    bad = _spoil(opt.state_dict(), key, lambda v: v - 1.0)
    with pytest.raises(ValueError, match=f"'{key}'.*negative"):
        opt.load_state_dict(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("cls", [TrasMuon, Muon, NAMO, AdamW])
def test_state_of_another_float_dtype_is_cast_the_same_way_on_both_backends(cls, dtype):
    results = {}
    for backend in BACKENDS:
        params, opt = make(cls, backend)
        sd = opt.state_dict()
        for entry in sd["state"].values():
            for key, value in entry.items():
                if key != "step":
                    entry[key] = value.to(dtype)
        opt.load_state_dict(sd)
        for state in opt.state.values():
            for key, value in state.items():
                if key != "step":
                    assert value.dtype == torch.float32, (key, value.dtype)
        set_grads(params, 3)
        opt.step()
        results[backend] = [p.detach().clone() for p in params]
    for e, t in zip(results["eager"], results["triton"], strict=True):
        torch.testing.assert_close(t, e, rtol=2e-2, atol=2e-4)


def test_a_resume_with_check_finite_still_refuses_a_nan():
    params, opt = make(TrasMuon, check_finite=True)
    saved = opt.state_dict()
    opt = TrasMuon(params, lr=0.01, check_finite=True)
    opt.load_state_dict(saved)
    set_grads(params, 4)
    params[0].grad[0, 0] = float("nan")
    before = snapshot(params, opt)
    with pytest.raises(RuntimeError, match="non-finite gradient"):
        opt.step()
    assert_unchanged(before, params, opt)


# ------------------------------------------------------------------------------------------
# Duplicate parameters
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES)
def test_a_parameter_listed_twice_is_refused(cls):
    w, b = nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused by us, not warned about by torch
        with pytest.raises(ValueError, match="parameter 2 is the same tensor as parameter 0"):
            cls([w, b, w])
        opt = cls([b])
        with pytest.raises(ValueError, match="param group 1: parameter 1 is the same tensor"):
            opt.add_param_group({"params": [w, w]})
    assert len(opt.param_groups) == 1 and not opt.state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", CLASSES)
def test_a_parameter_appended_twice_later_is_refused_at_the_step(cls, backend):
    params, opt = make(cls, backend)
    opt.param_groups[0]["params"].append(params[0])
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match="is the same tensor as parameter 0 of param group 0"):
        opt.step()
    assert_unchanged(before, params, opt)


# ------------------------------------------------------------------------------------------
# Tensor lrs
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [TrasMuon, AdamW])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_a_tensor_lr_put_in_later_is_checked_when_the_plan_binds_it(cls, backend, value):
    params, opt = make(cls, backend)
    opt.step()  # the plan is current: only the lrs are checked
    set_grads(params, 5)
    opt.param_groups[0]["lr"] = torch.tensor(value)
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match=r"param group 0: lr: a tensor lr must be finite and >= 0"):
        opt.step()
    assert_unchanged(before, params, opt)
    opt.param_groups[0]["lr"] = torch.tensor(0.02)
    opt.step()


def test_a_tensor_lr_on_the_meta_device_is_named():
    p = nn.Parameter(torch.randn(4, 8))
    with pytest.raises(ValueError, match="lr: a tensor lr on the meta device"):
        TrasMuon([p], lr=torch.tensor(0.01, device="meta"))


# ------------------------------------------------------------------------------------------
# Ranges and keys
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TrasMuon, NorMuon, NAMO, NAMOD])
def test_scale_is_range_checked(cls):
    p = nn.Parameter(torch.randn(4, 8))
    with pytest.raises(ValueError, match="scale must be"):
        cls([p], scale=1e300)
    cls([p], scale=1000.0)


def test_one_cycle_momentum_on_an_adamw_group_of_muon_is_warned_about():
    w, b = nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(10))
    opt = Muon([{"params": [w]}, {"params": [b], "rule": "adamw"}], lr=0.01)
    torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=5, cycle_momentum=True)
    set_grads([w, b], 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    messages = [str(w.message) for w in caught]
    assert any("param group 1 sets 'momentum'" in m and "'adamw'" in m for m in messages), messages
    assert not any("param group 0" in m for m in messages), messages


def test_a_key_of_another_rule_set_later_is_warned_about_once():
    w = nn.Parameter(torch.randn(6, 10))
    opt = TrasMuon([w])
    opt.param_groups[0]["momentum"] = 0.9  # Muon's key: TrasMuon and AdamW read betas
    set_grads([w], 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.step()
    messages = [str(w.message) for w in caught if "'momentum'" in str(w.message)]
    assert len(messages) == 1 and "do not read" in messages[0], messages


def test_the_exports_cover_every_class():
    assert {c.__name__ for c in CLASSES} <= set(trasmuon.__all__)

"""The optimizers as torch.optim optimizers: groups, dtypes, checkpoints, errors, diagnostics."""

import copy
import io

import pytest
import torch
from torch import nn

import trasmuon
from trasmuon import AdamW, Muon, NorMuon, TrasMuon, split_params

ALL = (TrasMuon, NorMuon, Muon, AdamW)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class TinyNet(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Embedding(17, 12)
        self.fc1 = nn.Linear(12, 24)
        self.norm = nn.LayerNorm(24)
        self.fc2 = nn.Linear(24, 9, bias=False)
        self.lm_head = nn.Linear(9, 17)
        self.to(dtype)

    def forward(self, idx):
        h = self.emb(idx)
        h = self.fc2(torch.relu(self.norm(self.fc1(h))))
        return self.lm_head(h)


def make_batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 17, (8, 5), generator=gen), torch.randint(0, 17, (8, 5), generator=gen))
            for _ in range(n)]


def train(model, opt, batches, sched=None):
    losses = []
    for x, y in batches:
        def closure(x=x, y=y):
            opt.zero_grad()
            out = model(x.to(next(model.parameters()).device))
            loss = nn.functional.cross_entropy(out.float().flatten(0, 1), y.flatten().to(out.device))
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
        if sched is not None:
            sched.step()
    return losses


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------
# Training and groups
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("device", DEVICES)
def test_loss_goes_down(cls, device):
    torch.manual_seed(0)
    model = TinyNet().to(device)
    opt = cls(model.parameters(), lr=0.05)
    batches = make_batches(1) * 25
    losses = train(model, opt, batches)
    assert losses[-1] < 0.75 * losses[0], losses


def test_rules_by_default_and_by_group():
    model = TinyNet()
    opt = TrasMuon(model.parameters())
    rules = {tuple(p.shape): opt.rule_of(opt.param_groups[0], p) for p in model.parameters()}
    assert rules[(24, 12)] == "trasmuon" and rules[(24,)] == "adamw"
    groups = [
        {"params": [model.fc1.weight], "rule": "muon", "adjust_lr_fn": "match_rms_adamw"},
        {"params": [model.fc2.weight], "rule": "normuon"},
        {"params": [model.lm_head.weight, model.emb.weight], "rule": "adamw", "lr": 3e-4},
        {"params": [model.fc1.bias, model.norm.weight, model.norm.bias, model.lm_head.bias]},
    ]
    opt = TrasMuon(groups, lr=0.01)
    train(model, opt, make_batches(3))
    assert set(opt.state[model.fc1.weight]) == {"step", "momentum"}
    assert set(opt.state[model.fc2.weight]) == {"step", "momentum", "row_v"}
    assert set(opt.state[model.lm_head.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[model.norm.weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_params_without_grad_are_skipped_and_unchanged():
    model = TinyNet()
    model.fc2.weight.requires_grad_(False)
    before = model.fc2.weight.detach().clone()
    opt = TrasMuon(model.parameters(), lr=0.1)
    train(model, opt, make_batches(2))
    assert torch.equal(model.fc2.weight, before)
    assert len(opt.state[model.fc2.weight]) == 0


def test_step_without_grads_is_a_noop():
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    opt = TrasMuon(model.parameters(), lr=0.1, weight_decay=0.5)
    opt.step()
    assert_same_tensors(before, model.state_dict())
    assert len(opt.state) == 0


def test_param_group_lr_and_weight_decay_apply_per_group():
    a, b, c = (nn.Parameter(torch.randn(8, 10)) for _ in range(3))
    a0, b0, c0 = (t.detach().clone() for t in (a, b, c))
    opt = TrasMuon([{"params": [a]}, {"params": [b], "lr": 0.0, "weight_decay": 0.5},
                    {"params": [c], "lr": 0.1, "weight_decay": 0.5}], lr=0.05)
    a.grad, b.grad, c.grad = torch.randn(8, 10), torch.randn(8, 10), torch.zeros(8, 10)
    opt.step()
    assert not torch.equal(a, a0)
    assert torch.equal(b, b0)  # lr = 0: no step and no decay (decay is lr * wd)
    # A zero gradient from a fresh state orthogonalizes to zero: only the decay is left.
    torch.testing.assert_close(c.detach(), c0 * (1 - 0.1 * 0.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("cls", ALL)
def test_lr_schedulers_drive_the_group_lr(cls):
    torch.manual_seed(0)
    model = TinyNet()
    opt = cls(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    train(model, opt, make_batches(10), sched)
    assert opt.param_groups[0]["lr"] != 0.02
    opt2 = cls(model.parameters(), lr=0.02)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=5)
    train(model, opt2, make_batches(5), sched2)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("cls", ALL)
def test_tensor_lr_matches_float_lr(cls):
    # float64 end to end, so the only difference is where lr * (...) is rounded.
    torch.manual_seed(0)
    m1, m2 = TinyNet(torch.float64), TinyNet(torch.float64)
    m2.load_state_dict(m1.state_dict())
    kw = dict(weight_decay=0.1)
    if cls is not AdamW:
        kw["ns_dtype"] = torch.float64
    o1 = cls(m1.parameters(), lr=0.01, **kw)
    o2 = cls(m2.parameters(), lr=torch.tensor(0.01, dtype=torch.float64), **kw)
    batches = make_batches(6)
    train(m1, o1, batches)
    train(m2, o2, batches)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_split_params_follows_muon_practice():
    model = TinyNet()
    groups = split_params(model)
    names = [[n for n, _ in g["params"]] for g in groups]
    assert names[0] == ["fc1.weight", "fc2.weight"]
    assert groups[0]["rule"] is None and groups[1]["rule"] == groups[2]["rule"] == "adamw"
    # Embeddings and heads keep the optimizer's weight decay; 1-D params get none.
    assert names[1] == ["emb.weight", "lm_head.weight"] and "weight_decay" not in groups[1]
    assert names[2] == ["fc1.bias", "norm.weight", "norm.bias", "lm_head.bias"]
    assert groups[2]["weight_decay"] == 0.0
    opt = TrasMuon(groups, lr=0.01, weight_decay=0.1)
    assert opt.param_groups[0]["param_names"] == ["fc1.weight", "fc2.weight"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    # Overridable: embeddings without decay, the no-decay group's own keys.
    groups = split_params(model, decay_embeddings=False, adamw_options={"weight_decay": 0.05},
                          no_decay_options={"lr": 0.001})
    assert [n for n, _ in groups[1]["params"]] == ["lm_head.weight"] and groups[1]["weight_decay"] == 0.05
    assert groups[2]["params"][0][0] == "emb.weight"
    assert groups[2]["weight_decay"] == 0.0 and groups[2]["lr"] == 0.001
    # The head's own group, its lr a function of its d_in (Dion: lr / sqrt(d_in)).
    groups = split_params(model, head_lr=lambda d_in: 0.02 / d_in ** 0.5)
    assert [n for n, _ in groups[1]["params"]] == ["lm_head.weight"]
    assert groups[1]["lr"] == pytest.approx(0.02 / 3.0) and groups[1]["rule"] == "adamw"
    assert [n for n, _ in groups[2]["params"]] == ["emb.weight"]
    assert split_params(model, head_lr=0.003)[1]["lr"] == 0.003
    with pytest.raises(ValueError, match="head_lr"):
        split_params(model, head_lr=-1.0)
    with pytest.raises(ValueError, match="decay_embeddings"):
        split_params(model, decay_embeddings=0)
    # Explicit heads, no head, a tied head, and the matrix rule option.
    assert [n for n, _ in split_params(model, head="fc2")[0]["params"]] == ["fc1.weight",
                                                                             "lm_head.weight"]
    assert len(split_params(model, head=None)[0]["params"]) == 3
    tied = TinyNet()
    tied.out = nn.Linear(12, 17, bias=False)
    tied.out.weight = tied.emb.weight
    assert "emb.weight" not in [n for n, _ in split_params(tied)[0]["params"]]
    # A tied head is an embedding table: it stays in the embeddings' group.
    assert [n for g in split_params(tied, head=("lm_head", "out"), head_lr=0.003) if g.get("lr") == 0.003
            for n, _ in g["params"]] == ["lm_head.weight"]
    assert split_params(model, matrix_rule="muon")[0]["rule"] == "muon"
    with pytest.raises(ValueError, match="matrix_rule"):
        split_params(model, matrix_rule="adamw")


def test_unnamed_params_join_named_groups_and_the_reverse():
    """torch refuses groups with and without names side by side; here the side without
    names is named by place, and a checkpoint round trip keeps them."""
    model, extra = TinyNet(), nn.Linear(5, 5)
    opt = TrasMuon(split_params(model), lr=0.01)
    opt.add_param_group({"params": [extra.weight, extra.bias]})
    assert opt.param_groups[-1]["param_names"] == ["param_groups[3][0]", "param_groups[3][1]"]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt = TrasMuon([extra.weight], lr=0.01)
    opt.add_param_group({"params": [("fc1.weight", model.fc1.weight)]})
    assert [g["param_names"] for g in opt.param_groups] == [["param_groups[0][0]"], ["fc1.weight"]]


# ------------------------------------------------------------------------------------------
# Dtypes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_params_keep_float32_state_and_track_fp32(cls, dtype, device):
    torch.manual_seed(0)
    ref_model = TinyNet().to(device)
    low = TinyNet(dtype).to(device)
    low.load_state_dict(ref_model.state_dict())
    o_ref = cls(ref_model.parameters(), lr=0.01)
    o_low = cls(low.parameters(), lr=0.01)
    batches = make_batches(4)
    train(ref_model, o_ref, batches)
    train(low, o_low, batches)
    for p in low.parameters():
        assert p.dtype == dtype
        for key, value in o_low.state[p].items():
            assert value.dtype == torch.float32, key
    for p, q in zip(ref_model.parameters(), low.parameters(), strict=True):
        assert torch.isfinite(q).all()
        rel = (p - q.float()).norm() / p.norm()
        assert rel < 2e-2, rel


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_checkpoint_is_bit_identical(cls, dtype):
    torch.manual_seed(0)
    batches = make_batches(10)
    kw = dict(lr=0.01, weight_decay=0.05)
    straight = TinyNet(dtype)
    init = copy.deepcopy(straight.state_dict())
    opt = cls(straight.parameters(), **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    train(straight, opt, batches, sched)

    first = TinyNet(dtype)
    first.load_state_dict(init)
    opt1 = cls(first.parameters(), **kw)
    sched1 = torch.optim.lr_scheduler.StepLR(opt1, step_size=3, gamma=0.5)
    train(first, opt1, batches[:5], sched1)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(),
                "sched": sched1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = TinyNet(dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = cls(resumed.parameters(), **kw)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=3, gamma=0.5)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    for p in resumed.parameters():
        for key, value in opt2.state[p].items():
            assert value.dtype == torch.float32, key
            assert value.device == (torch.device("cpu") if key == "step" else p.device)
    train(resumed, opt2, batches[5:], sched2)
    assert_same_tensors(straight.state_dict(), resumed.state_dict())
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert_same_tensors(opt.state[p], opt2.state[q])


def test_state_dict_round_trip_keeps_dtypes_and_does_not_alias():
    model = TinyNet(torch.bfloat16)
    opt = TrasMuon(model.parameters(), lr=0.01)
    train(model, opt, make_batches(2))
    sd = opt.state_dict()
    opt2 = TrasMuon(model.parameters(), lr=0.01)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        for key, value in opt2.state[p].items():
            assert value.dtype == opt.state[p][key].dtype
            assert torch.equal(value, opt.state[p][key])
            assert value.data_ptr() != opt.state[p][key].data_ptr()


def test_load_state_dict_hooks_see_restored_state():
    model = TinyNet(torch.bfloat16)
    opt = TrasMuon(model.parameters(), lr=0.01)
    train(model, opt, make_batches(2))
    sd = opt.state_dict()
    seen = []
    opt2 = TrasMuon(model.parameters(), lr=0.01)
    opt2.register_load_state_dict_pre_hook(lambda o, s: seen.append("pre"))
    opt2.register_load_state_dict_post_hook(
        lambda o: seen.append(o.state[model.fc1.weight]["momentum"].dtype))
    opt2.load_state_dict(sd)
    assert seen == ["pre", torch.float32]


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
BAD_HYPERPARAMETERS = [
    ("lr", -1.0), ("lr", float("nan")), ("betas", (0.9, 1.0)), ("betas", (-0.1, 0.9)),
    ("eps", 0.0), ("weight_decay", -0.1), ("ns_steps", 0), ("ns_steps", 2.5),
    ("ns_coefficients", (1.0, 2.0)), ("ns_coefficients", ()), ("ns_dtype", torch.int32),
    ("scale", 0.0), ("clip_alpha", -1.0), ("clip_min", 0.0), ("clip_min", 1.5),
    ("clip_trigger", -1.0), ("clip_period", 0), ("clip_min_cols", 0), ("clip_beta", 1.0),
    ("energy_beta", 1.0), ("energy_quantile", 0.0), ("energy_quantile", 1.5),
    ("energy_eps", 0.0), ("energy_source", "weights"), ("warmup_steps", -1),
    ("warmup_steps", True), ("schedule_free", 1), ("sf_mix", 1.5), ("nesterov", "yes"),
    ("clip", None), ("ns_method", "fast"), ("ns_method", None), ("ns_restarts", (0,)),
    ("ns_restarts", (2, 2)), ("ns_restarts", 2), ("ns_restarts", (1.5,)),
]


@pytest.mark.parametrize(("key", "value"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_name_the_key(key, value):
    p = nn.Parameter(torch.randn(4, 8))
    with pytest.raises(ValueError, match=key):
        TrasMuon([p], **{key: value})
    with pytest.raises(ValueError, match=f"param group 1: {key}"):
        TrasMuon([{"params": [nn.Parameter(torch.randn(3, 3))]}, {"params": [p], key: value}])


def test_bad_values_set_on_a_group_later_are_caught_at_step():
    p = nn.Parameter(torch.randn(4, 8))
    opt = TrasMuon([p])
    opt.param_groups[0]["clip_min"] = 2.0
    p.grad = torch.randn(4, 8)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="clip_min"):
        opt.step()
    assert torch.equal(p, before) and len(opt.state) == 0


def test_other_construction_errors():
    p = nn.Parameter(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"rule must be"):
        TrasMuon([{"params": [p], "rule": "sgd"}])
    with pytest.raises(ValueError, match="rule 'trasmuon' needs a 2D parameter"):
        TrasMuon([{"params": [nn.Parameter(torch.randn(4))], "rule": "trasmuon"}])
    with pytest.raises(ValueError, match="backend"):
        TrasMuon([p], backend="cuda")
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        TrasMuon([p], lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon([p], adjust_lr_fn="sqrt")


def test_sparse_and_complex_gradients_are_refused_by_name_before_any_change():
    emb = nn.Embedding(10, 4, sparse=True)
    dense = nn.Parameter(torch.randn(4, 8))
    opt = TrasMuon([("dense", dense), ("emb.weight", emb.weight)])
    dense.grad = torch.randn(4, 8)
    emb(torch.tensor([1, 2])).sum().backward()
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match=r"'emb\.weight'.*sparse"):
        opt.step()
    assert torch.equal(dense, before) and len(opt.state) == 0
    c = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    opt = TrasMuon([c])
    c.grad = torch.randn(3, 3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0 is complex"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_refuses_nonfinite_grads_and_changes_nothing(bad):
    model = TinyNet()
    opt = TrasMuon(split_params(model), lr=0.01, check_finite=True)
    train(model, opt, make_batches(1))
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.fc2.weight.grad[1, 2] = bad
    with pytest.raises(RuntimeError, match=r"'fc2\.weight'.*non-finite"):
        opt.step()
    assert_same_tensors(weights, model.state_dict())
    for k, v in opt.state_dict()["state"].items():
        assert_same_tensors(v, state["state"][k])


def test_without_check_finite_nan_reaches_the_state_as_documented():
    p = nn.Parameter(torch.randn(4, 8))
    opt = TrasMuon([p])
    p.grad = torch.full((4, 8), float("nan"))
    opt.step()
    assert torch.isnan(opt.state[p]["momentum"]).all()


# ------------------------------------------------------------------------------------------
# Diagnostics
# ------------------------------------------------------------------------------------------
def test_diagnostics_report_the_appendix_g_observables():
    model = TinyNet()
    opt = TrasMuon(split_params(model), lr=0.01, diagnostics=True, clip_min_cols=8)
    train(model, opt, make_batches(3))
    diag = opt.diagnostics()
    assert set(diag) == {"fc1.weight", "fc2.weight"}
    d = diag["fc2.weight"]  # 9 x 24: gated
    for key in ("eta_hat", "energy_cur", "energy_ref", "r_q95", "r_max", "c_min", "c_mean",
                "triggered_frac", "c_ema_min", "c_avg_mean"):
        assert key in d and isinstance(d[key], float), key
    assert 0.7 <= d["c_min"] <= d["c_mean"] <= 1.0
    assert d["r_q95"] <= d["r_max"] and 0.0 <= d["triggered_frac"] <= 1.0
    state = opt.state[model.fc2.weight]
    assert d["energy_ref"] == pytest.approx(float(state["energy_ref"]))
    with pytest.raises(RuntimeError, match="diagnostics=True"):
        TrasMuon(model.parameters()).diagnostics()


def test_muon_and_normuon_diagnostics():
    p = nn.Parameter(torch.randn(6, 4))
    for cls, key in ((Muon, "step_size"), (NorMuon, "eta_hat")):
        opt = cls([p], lr=0.1, diagnostics=True)
        p.grad = torch.randn(6, 4)
        opt.step()
        assert set(opt.diagnostics()["group0.param0"]) == {key}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs CUDA")
def test_cuda_step_does_not_sync_the_host():
    model = TinyNet().cuda()
    opt = TrasMuon(model.parameters(), lr=0.01, diagnostics=True)
    train(model, opt, make_batches(1))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_exports():
    assert set(trasmuon.RULES) == {"trasmuon", "normuon", "muon", "muon_rows", "namo", "namo_d", "adamw"}
    assert trasmuon.TrasMuon.matrix_rule == "trasmuon"


# ------------------------------------------------------------------------------------------
# Options survive resume, deepcopy and pickling
# ------------------------------------------------------------------------------------------
OPTIONS = dict(backend="eager", check_finite=True, diagnostics=True)


def _restored(opt, how):
    if how == "load_state_dict":
        opt.load_state_dict(opt.state_dict())
        return opt
    if how == "deepcopy":
        return copy.deepcopy(opt)
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["load_state_dict", "deepcopy", "pickle"])
@pytest.mark.parametrize("cls", ALL)
def test_constructor_options_survive(cls, how):
    """A resume keeps backend, check_finite and diagnostics: a NaN gradient is still refused
    with nothing changed, and diagnostics still read."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = cls(split_params(model), lr=0.01, **OPTIONS)
    train(model, opt, make_batches(2))
    opt = _restored(opt, how)
    if how != "load_state_dict":  # the copy has its own params: step those
        model = None
        params = [p for g in opt.param_groups for p in g["params"]]
    else:
        params = list(model.parameters())
    assert (opt.backend, opt.check_finite, opt.diagnostics_enabled) == ("eager", True, True)
    before = [p.detach().clone() for p in params]
    states = copy.deepcopy(opt.state_dict()["state"])
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad.view(-1)[0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    for k, v in opt.state_dict()["state"].items():
        assert_same_tensors(v, states[k])
    params[1].grad.zero_()
    opt.step()
    if cls is not AdamW:
        assert opt.diagnostics()  # reads, and has entries for the matrices


def test_load_state_dict_refuses_state_that_does_not_fit_before_changing_anything():
    a = TinyNet()
    opt = TrasMuon(split_params(a), lr=0.01)
    train(a, opt, make_batches(1))
    sd = opt.state_dict()
    # Same structure, other shapes: fc1 is 24x12 here, make its saved momentum 12x24.
    bad = copy.deepcopy(sd)
    fc1 = 0  # first param of the matrix group
    bad["state"][fc1]["momentum"] = bad["state"][fc1]["momentum"].mT.contiguous()
    fresh = TrasMuon(split_params(a), lr=0.01)
    with pytest.raises(ValueError, match=r"'momentum' of parameter 'fc1\.weight'.*\(12, 24\)"):
        fresh.load_state_dict(bad)
    assert len(fresh.state) == 0
    bad = copy.deepcopy(sd)
    bad["state"][1]["c_ema"] = torch.ones(5)  # fc2 has 24 columns
    with pytest.raises(ValueError, match=r"'c_ema' of parameter 'fc2\.weight'"):
        fresh.load_state_dict(bad)
    fresh.load_state_dict(sd)  # the right one still loads


@pytest.mark.parametrize("name", sorted(trasmuon.rules.REGISTRY))
def test_rules_declare_every_state_name_they_create(name):
    rule = trasmuon.rules.get_rule(name)
    created = set()
    for extra in ({}, {"schedule_free": True}, {"clip": False}):
        group = {**rule.defaults, **{k: v for k, v in extra.items() if k in rule.keys}}
        for shape in ((12, 3), (12, 16)):
            created |= {e.name for e in rule.state_entries(group, shape)}
    assert created == rule.state_names


def test_muon_checkpoints_with_betas_load_as_momentum_and_adamw_beta2():
    p, bias = nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(6))
    sd = Muon([p, bias]).state_dict()
    for group in sd["param_groups"]:  # the groups as older versions saved them
        del group["momentum"], group["adamw_beta2"]
        group["betas"] = (0.8, 0.9)
    opt = Muon([p, bias])
    opt.load_state_dict(sd)
    group = opt.param_groups[0]
    assert (group["momentum"], group["adamw_beta2"]) == (0.8, 0.9) and "betas" not in group


def test_state_of_another_rule_is_left_alone_on_load():
    p = nn.Parameter(torch.randn(6, 10))
    namo = trasmuon.NAMOD([p])
    p.grad = torch.randn(6, 10)
    namo.step()
    sd = namo.state_dict()
    opt = TrasMuon([p])
    opt.load_state_dict(sd)  # col_grad_sq_avg is NAMO-D's: kept, not read, not refused
    assert set(opt.state[p]) >= {"momentum", "col_grad_sq_avg"}


# ------------------------------------------------------------------------------------------
# Keys no rule reads; the Triton backend asked for where it cannot run
# ------------------------------------------------------------------------------------------
def _warning_messages(fn):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


def test_keys_no_rule_reads_are_warned_about_once_naming_key_and_group():
    p, q = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4, 8))
    msgs = _warning_messages(lambda: TrasMuon([{"params": [p]}, {"params": [q], "weight_deacy": 0.1,
                                                                 "momentum": 0.9}]))
    assert len(msgs) == 2, msgs
    assert any("param group 1" in m and "'weight_deacy'" in m for m in msgs)
    assert any("param group 1" in m and "'momentum'" in m for m in msgs)
    # A key of another rule in a Muon group; Muon's own "momentum" is fine.
    msgs = _warning_messages(lambda: Muon([{"params": [p], "clip_min": 0.5, "momentum": 0.9}]))
    assert len(msgs) == 1 and "'clip_min'" in msgs[0] and "'muon'" in msgs[0], msgs
    # A key added later is warned about at the next step, once.
    opt = TrasMuon([p])
    opt.param_groups[0]["nesterov_momentum"] = 0.5
    p.grad = torch.randn(4, 8)
    msgs = _warning_messages(opt.step) + _warning_messages(opt.step)
    assert len(msgs) == 1 and "'nesterov_momentum'" in msgs[0], msgs
    # What torch's schedulers add to groups is not warned about.
    opt = TrasMuon([p], lr=0.01)
    msgs = _warning_messages(lambda: torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=5))
    msgs += _warning_messages(opt.step)
    assert not [m for m in msgs if "has no effect" in m], msgs


def test_triton_on_a_cpu_without_the_interpreter_warns_once_per_plan(monkeypatch):
    model = TinyNet()
    opt = TrasMuon(split_params(model), lr=0.01, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    msgs = _warning_messages(opt.step) + _warning_messages(opt.step)
    assert len(msgs) == 1, msgs
    # Every parameter with a gradient (the AdamW ones have a kernel too), in one line.
    assert "8 parameters" in msgs[0] and "'fc1.weight'" in msgs[0] and "cpu" in msgs[0], msgs


# ------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------
def test_compiled_training_step_breaks_the_graph_at_the_optimizer_and_never_recompiles():
    """The step is a clean graph break (``torch.compiler.disable``): a compiled function that
    calls ``opt.step()`` compiles once, does not recompile per step or per parameter, and
    gives the uncompiled run's bits."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = TinyNet()
    ref_model = copy.deepcopy(model)
    opt = TrasMuon(split_params(model), lr=0.02, backend="eager")
    ref_opt = TrasMuon(split_params(ref_model), lr=0.02, backend="eager")

    def train_step(m, o, x, y):
        loss = nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten())
        loss.backward()
        o.step()
        o.zero_grad()
        return loss

    counter = CompileCounter()
    compiled = torch.compile(train_step, backend=counter)
    frames = []
    for x, y in make_batches(6):
        compiled(model, opt, x, y)
        train_step(ref_model, ref_opt, x, y)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[-1] == frames[0], frames
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)

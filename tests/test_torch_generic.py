"""PyTorch's generic optimizer checks, applied to our four classes.

The machinery (``OptimizerInfo``, ``OptimizerInput``, ``optims``, device-type test
instantiation) ships in the torch wheel; upstream's test/test_optim.py does not, so the
checks it applies to every optimizer are restated here, each in the spirit of the upstream
test of the same name.
"""

import copy
import io
import math
import warnings

import torch
from torch.nn import Parameter
from torch.testing._internal.common_device_type import instantiate_device_type_tests
from torch.testing._internal.common_optimizers import (
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
    optims,
)
from torch.testing._internal.common_utils import TestCase

from trasmuon import AdamW, Muon, NorMuon, TrasMuon


def _shared_inputs():
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.02}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.01)}, desc="Tensor lr"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="weight_decay"),
    ]


def trasmuon_inputs(device, dtype=None):
    return [
        *_shared_inputs(),
        OptimizerInput(params=None, kwargs={"nesterov": True}, desc="nesterov"),
        OptimizerInput(params=None, kwargs={"warmup_steps": 2, "clip_period": 1}, desc="warmup"),
        OptimizerInput(params=None, kwargs={"clip_trigger": None}, desc="continuous gate"),
        OptimizerInput(params=None, kwargs={"energy_source": "grad"}, desc="energy of grad"),
        OptimizerInput(params=None, kwargs={"energy_source": "update"}, desc="energy of update"),
        OptimizerInput(params=None, kwargs={"schedule_free": False}, desc="clip-only"),
        OptimizerInput(params=None, kwargs={"clip": False}, desc="no clip"),
        OptimizerInput(params=None, kwargs={"ns_dtype": torch.float32, "ns_steps": 3},
                       desc="fp32 Newton-Schulz"),
    ]


def normuon_inputs(device, dtype=None):
    return [*_shared_inputs(),
            OptimizerInput(params=None, kwargs={"scale": 1.0, "betas": (0.9, 0.99)},
                           desc="scale and betas")]


def muon_inputs(device, dtype=None):
    return [
        *_shared_inputs(),
        OptimizerInput(params=None, kwargs={"momentum": 0.8, "nesterov": False}, desc="momentum"),
        OptimizerInput(params=None, kwargs={"adjust_lr_fn": "match_rms_adamw"}, desc="rms lr"),
        OptimizerInput(params=None, kwargs={"ns_steps": 6, "ns_coefficients": (3.4, -4.7, 2.0)},
                       desc="ns options"),
    ]


def adamw_inputs(device, dtype=None):
    return [*_shared_inputs(),
            OptimizerInput(params=None, kwargs={"betas": (0.8, 0.9), "eps": 1e-6}, desc="betas")]


def error_inputs(device, dtype):
    # Upstream's construction errors shared by every optimizer (param types, duplicates,
    # Tensor lr size, names); our own hyperparameter errors are in test_optimizer_api.py.
    # Two deliberate differences (docs/usage.md): torch warns about a parameter listed twice
    # in a group (and plans to refuse it), we refuse it; torch refuses groups with and
    # without names side by side, we name the side without names (test_optimizer_api.py,
    # test_unnamed_params_join_named_groups_and_the_reverse, builds upstream's input).
    out, mixed_names = [], 0
    for error_input in get_error_inputs_for_all_optims(device, dtype):
        if error_input.error_type is UserWarning and "duplicate" in error_input.error_regex:
            error_input = copy.copy(error_input)
            error_input.error_type = ValueError
            error_input.error_regex = "is the same tensor as parameter 0 of the group"
        elif "param groups should be with/without names" in error_input.error_regex:
            mixed_names += 1
            continue
        out.append(error_input)
    assert any(e.error_type is ValueError and "same tensor" in e.error_regex for e in out)
    assert mixed_names == 1  # (upstream's input is still there, and taken out once)
    return out


OPTIM_INFOS = [
    OptimizerInfo(cls, optim_inputs_func=fn, optim_error_inputs_func=error_inputs,
                  supported_impls=(), supports_complex=False, not_og_supported_flags=())
    for cls, fn in ((TrasMuon, trasmuon_inputs), (NorMuon, normuon_inputs),
                    (Muon, muon_inputs), (AdamW, adamw_inputs))
]


def _model(device, dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3, bias=False),
    ).to(device=device, dtype=dtype)


def _loss(model, device, dtype):
    x = torch.linspace(-1, 1, 48, device=device, dtype=dtype).reshape(8, 6)
    return (model(x) - 0.3).square().mean()


def _take_steps(opt, model, device, dtype, steps):
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, device, dtype).backward()
        opt.step()


def _constructor_kwargs(optim_input):
    kwargs = dict(optim_input.kwargs)
    if isinstance(kwargs.get("lr"), torch.Tensor):
        kwargs["lr"] = kwargs["lr"].clone()
    return kwargs


class TestGenericOptimizer(TestCase):
    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_errors(self, device, dtype, optim_info):
        for error_input in optim_info.optim_error_inputs_func(device=device, dtype=dtype):
            inp = error_input.optimizer_error_input
            if issubclass(error_input.error_type, Warning):
                with self.assertWarnsRegex(error_input.error_type, error_input.error_regex):
                    optim_info.optim_cls(inp.params, **inp.kwargs)
            else:
                with self.assertRaisesRegex(error_input.error_type, error_input.error_regex):
                    optim_info.optim_cls(inp.params, **inp.kwargs)

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_forloop_goes_right_direction(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            for with_scheduler in (False, True):
                model = _model(device, dtype)
                opt = optim_info.optim_cls(model.parameters(), **_constructor_kwargs(optim_input))
                sched = torch.optim.lr_scheduler.StepLR(opt, 10, 0.9) if with_scheduler else None
                initial = _loss(model, device, dtype).item()
                for _ in range(20):
                    _take_steps(opt, model, device, dtype, 1)
                    if sched is not None:
                        sched.step()
                final = _loss(model, device, dtype).item()
                self.assertLess(final, initial, msg=optim_input.desc)

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_param_groups_weight_decay_and_lr(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            kwargs = _constructor_kwargs(optim_input)
            kwargs.pop("lr", None)
            model = _model(device, dtype)
            first, last = model[0], model[2]
            groups = [
                {"params": [first.weight, first.bias], "weight_decay": 0.1, "lr": 0.02},
                {"params": [last.weight], "lr": 0.005},
            ]
            opt = optim_info.optim_cls(groups, **kwargs)
            initial = _loss(model, device, dtype).item()
            _take_steps(opt, model, device, dtype, 20)
            self.assertEqual(opt.param_groups[0]["weight_decay"], 0.1)
            self.assertEqual(opt.param_groups[1]["lr"], 0.005)
            self.assertLess(_loss(model, device, dtype).item(), initial, msg=optim_input.desc)

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_step_is_noop_when_params_have_no_grad(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            model = _model(device, dtype)
            before = copy.deepcopy(list(model.parameters()))
            opt = optim_info.optim_cls(model.parameters(), **_constructor_kwargs(optim_input))
            opt.step()
            for p, q in zip(model.parameters(), before, strict=True):
                self.assertEqual(p, q, atol=0, rtol=0)
            self.assertEqual(len(opt.state), 0)

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_step_is_noop_for_zero_grads(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            kwargs = _constructor_kwargs(optim_input)
            kwargs["weight_decay"] = 0.0  # decoupled decay moves weights without a gradient
            model = _model(device, dtype)
            before = copy.deepcopy(list(model.parameters()))
            opt = optim_info.optim_cls(model.parameters(), **kwargs)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
            for p, q in zip(model.parameters(), before, strict=True):
                self.assertEqual(p, q, atol=0, rtol=0, msg=optim_input.desc)

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_grads_are_not_modified(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            model = _model(device, dtype)
            opt = optim_info.optim_cls(model.parameters(), **_constructor_kwargs(optim_input))
            for _ in range(3):
                opt.zero_grad()
                _loss(model, device, dtype).backward()
                grads = [p.grad.clone() for p in model.parameters()]
                opt.step()
                for p, g in zip(model.parameters(), grads, strict=True):
                    self.assertEqual(p.grad, g, atol=0, rtol=0)

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_state_dict_deterministic(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            kwargs = _constructor_kwargs(optim_input)
            model = _model(device, dtype)
            opt = optim_info.optim_cls(model.parameters(), **kwargs)
            _take_steps(opt, model, device, dtype, 3)
            clone = copy.deepcopy(model)
            opt_c = optim_info.optim_cls(clone.parameters(), **_constructor_kwargs(optim_input))
            opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
            for _ in range(4):
                for m, o in ((model, opt), (clone, opt_c)):
                    o.zero_grad()
                    _loss(m, device, dtype).backward()
                    o.step()
                for p, q in zip(model.parameters(), clone.parameters(), strict=True):
                    self.assertEqual(p, q, atol=0, rtol=0, msg=optim_input.desc)
            self.assertEqual(opt.state_dict()["param_groups"], opt_c.state_dict()["param_groups"])

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_save_load_equality_with_weights_only(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            model = _model(device, dtype)
            opt = optim_info.optim_cls(model.parameters(), **_constructor_kwargs(optim_input))
            _take_steps(opt, model, device, dtype, 2)
            sd = opt.state_dict()
            buf = io.BytesIO()
            torch.save(sd, buf)
            buf.seek(0)
            loaded = torch.load(buf, weights_only=True)
            self.assertEqual(loaded, sd)
            fresh = optim_info.optim_cls(model.parameters(), **_constructor_kwargs(optim_input))
            fresh.load_state_dict(loaded)
            self.assertEqual(fresh.state_dict(), sd)

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_load_nontensor_step(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            model = _model(device, dtype)
            opt = optim_info.optim_cls(model.parameters(), **_constructor_kwargs(optim_input))
            _take_steps(opt, model, device, dtype, 2)
            sd = opt.state_dict()
            for state in sd["state"].values():
                state["step"] = float(state["step"])
            opt.load_state_dict(sd)
            _take_steps(opt, model, device, dtype, 1)
            for state in opt.state.values():
                self.assertEqual(float(state["step"]), 3.0)

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_deepcopy_copies_all_public_attrs(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            model = _model(device, dtype)
            opt = optim_info.optim_cls(model.parameters(), **_constructor_kwargs(optim_input))
            _take_steps(opt, model, device, dtype, 1)

            def public(o):
                return {k: v for k, v in vars(o).items() if not k.startswith("_")}

            clone = copy.deepcopy(opt)
            self.assertEqual(public(opt).keys(), public(clone).keys())
            for key, value in public(opt).items():
                if key != "state":  # keyed by param objects, which deepcopy replaces
                    self.assertEqual(value, public(clone)[key], msg=key)

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_step_and_state_dict_hooks(self, device, dtype, optim_info):
        model = _model(device, dtype)
        opt = optim_info.optim_cls(model.parameters())
        calls = []
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

        def post_sd(o, sd):
            calls.append("sd_post")
            sd["note"] = 1
            return sd

        opt.register_state_dict_post_hook(post_sd)
        _loss(model, device, dtype).backward()
        opt.step()
        self.assertEqual(opt.state_dict()["note"], 1)
        self.assertEqual(calls, ["pre", "post", "sd_pre", "sd_post"])

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_optimizer_can_be_printed(self, device, dtype, optim_info):
        opt = optim_info.optim_cls(_model(device, dtype).parameters())
        text = repr(opt)
        self.assertIn(optim_info.optim_cls.__name__, text)
        self.assertIn("Parameter Group 0", text)

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_mixed_dtypes_in_one_optimizer(self, device, dtype, optim_info):
        params = [Parameter(torch.randn(5, 9, device=device, dtype=d))
                  for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
        params.append(Parameter(torch.randn(9, device=device, dtype=torch.bfloat16)))
        opt = optim_info.optim_cls(params, lr=0.01)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        for p in params:
            self.assertTrue(torch.isfinite(p).all())
            for key, value in opt.state[p].items():
                if key != "step":
                    expected = torch.float64 if p.dtype == torch.float64 else torch.float32
                    self.assertEqual(value.dtype, expected)

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_non_empty_state_after_step(self, device, dtype, optim_info):
        model = _model(device, dtype)
        opt = optim_info.optim_cls(model.parameters())
        _loss(model, device, dtype).backward()
        opt.step()
        for p in model.parameters():
            self.assertGreater(len(opt.state[p]), 0)
            for value in opt.state[p].values():
                self.assertTrue(torch.isfinite(value).all())

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_complex_params_are_refused(self, device, dtype, optim_info):
        p = Parameter(torch.randn(3, 4, device=device, dtype=torch.complex64))
        opt = optim_info.optim_cls([p])
        p.grad = torch.randn_like(p)
        with self.assertRaisesRegex(RuntimeError, "complex"):
            opt.step()

    @optims(OPTIM_INFOS, dtypes=[torch.float32])
    def test_closure_loss_is_returned(self, device, dtype, optim_info):
        model = _model(device, dtype)
        opt = optim_info.optim_cls(model.parameters())

        def closure():
            opt.zero_grad()
            loss = _loss(model, device, dtype)
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = opt.step(closure)
        self.assertTrue(math.isfinite(loss.item()))


instantiate_device_type_tests(TestGenericOptimizer, globals(), allow_mps=False, only_for=("cpu", "cuda"))

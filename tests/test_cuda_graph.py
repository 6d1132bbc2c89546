"""``cuda_graph=True`` (trasmuon/graph.py): the optimizer captures its own step and replays it.

On the CPU the graph is ``LaunchListGraph`` (launches recorded while capturing, issued in
order at replay) under the Triton interpreter: the bookkeeping (when it warms up, captures,
replays and captures again, what it refuses) and the results (every replayed step equals the
uncaptured run bit for bit, float lrs changed by a scheduler included). The real capture runs
on a GPU (``tests/test_step_plan.py::test_capture_and_replay_on_a_gpu`` and
``bench/gpu_step.py``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from trasmuon import NAMOD, AdamW, Muon, NorMuon, TrasMuon
from trasmuon.graph import WARMUP_STEPS, LaunchListGraph

CLASSES = (TrasMuon, NorMuon, Muon, NAMOD, AdamW)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(12, 20), (12, 20), (20, 9), (7,), (5, 3)]
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def _grads(step: int, params) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _build(cls, params, graph: bool):
    kw = dict(lr=0.02, backend="triton", cuda_graph=graph)
    if cls is not AdamW:
        kw["ns_steps"] = 2
    opt = cls([{"params": params[:3]}, {"params": params[3:], "rule": "adamw"}], **kw)
    if graph:
        opt._capture.graph_factory = LaunchListGraph
    return opt


def _step(opt, params, grads) -> None:
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)  # in place: the captured gradients' addresses stay
    opt.step()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_replayed_steps_equal_uncaptured_steps(cls):
    plain_params, graph_params = _params(), _params()
    plain, graphed = _build(cls, plain_params, False), _build(cls, graph_params, True)
    for step in range(1, 7):
        grads = _grads(step, plain_params)
        for opt in (plain, graphed):
            for group in opt.param_groups:
                group["lr"] = 0.02 / step  # float lrs: staged before every replay
        _step(plain, plain_params, grads)
        _step(graphed, graph_params, grads)
        for p, q in zip(plain_params, graph_params, strict=True):
            assert torch.equal(p, q), (cls.__name__, step)
        for p, q in zip(plain_params, graph_params, strict=True):
            for key, value in plain.state[p].items():
                assert torch.equal(value, graphed.state[q][key]), (cls.__name__, step, key)
    capture = graphed._capture
    # Steps 1-2 warm up, step 3 is captured (and replayed once), steps 4-6 replay.
    assert capture.captures == 1 and capture.replays == 6 - WARMUP_STEPS - 1
    assert capture.graph.replays == 6 - WARMUP_STEPS


def test_moved_gradients_and_a_new_plan_capture_again():
    params = _params()
    opt = _build(TrasMuon, params, True)
    for step in range(1, 5):
        _step(opt, params, _grads(step, params))
    capture = opt._capture
    assert capture.captures == 1 and capture.replays == 1
    # New gradient tensors: two uncaptured steps, then a new capture.
    for p in params:
        p.grad = None
    for step in range(5, 8):
        _step(opt, params, _grads(step, params))
    assert capture.captures == 2 and capture.moved == 1
    # A changed hyperparameter is a new plan: warmed up and captured again.
    opt.param_groups[0]["weight_decay"] = 0.1
    for step in range(8, 11):
        _step(opt, params, _grads(step, params))
    assert capture.captures == 3
    # Gradients that keep moving: a warning that says what to do.
    with pytest.warns(UserWarning, match="set_to_none=False"):
        for _ in range(3):
            for p in params:
                p.grad = None
            for step in range(3):
                _step(opt, params, _grads(step, params))


def test_a_step_that_cannot_be_captured_runs_uncaptured_with_one_warning():
    params = _params()
    opt = TrasMuon([{"params": params[:3]}, {"params": params[3:], "rule": "adamw"}], lr=0.02,
                   backend="eager", cuda_graph=True)
    reference = TrasMuon([{"params": [p.detach().clone().requires_grad_() for p in params[:3]]},
                          {"params": [p.detach().clone().requires_grad_() for p in params[3:]],
                           "rule": "adamw"}], lr=0.02, backend="eager")
    ref_params = [p for g in reference.param_groups for p in g["params"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 5):
            _step(opt, params, _grads(step, params))
            _step(reference, ref_params, _grads(step, params))
    messages = [str(w.message) for w in caught if "cuda_graph" in str(w.message)]
    assert len(messages) == 1 and "eager backend" in messages[0], messages
    assert opt._capture.captures == 0
    for p, q in zip(params, ref_params, strict=True):
        assert torch.equal(p, q)


def test_cuda_graph_must_be_a_bool_and_survives_a_checkpoint():
    with pytest.raises(ValueError, match="cuda_graph"):
        TrasMuon(_params()[:1], cuda_graph=1)
    params = _params()
    opt = _build(TrasMuon, params, True)
    for step in range(1, 5):
        _step(opt, params, _grads(step, params))
    opt.load_state_dict(opt.state_dict())
    assert opt.cuda_graph and opt._capture.captures == 0  # (the old graph is dropped)
    assert opt._capture.graph_factory is LaunchListGraph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a GPU")
def test_self_capture_on_a_gpu():
    """The real thing: torch.cuda.CUDAGraph, compiled kernels, float lrs staged per replay."""
    plain_params = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    graph_params = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    plain = TrasMuon([{"params": plain_params[:3]}, {"params": plain_params[3:], "rule": "adamw"}],
                     lr=0.02, backend="triton")
    graphed = TrasMuon([{"params": graph_params[:3]}, {"params": graph_params[3:], "rule": "adamw"}],
                       lr=0.02, backend="triton", cuda_graph=True)
    for step in range(1, 8):
        grads = [g.cuda() for g in _grads(step, plain_params)]
        for opt in (plain, graphed):
            for group in opt.param_groups:
                group["lr"] = 0.02 / step
        _step(plain, plain_params, grads)
        _step(graphed, graph_params, grads)
    torch.cuda.synchronize()
    assert graphed._capture.captures == 1 and graphed._capture.replays == 7 - WARMUP_STEPS - 1
    for p, q in zip(plain_params, graph_params, strict=True):
        assert torch.equal(p, q)

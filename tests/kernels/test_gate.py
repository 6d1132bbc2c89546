"""The gate kernel (trasmuon_kernels.gate) against ``reference.gate_stage_`` and the exact
selection against ``torch.kthvalue``.

Exactness: the selected quantile is always bit-identical. The gate vector and state are
bit-identical in float32 whenever the log's last bit does not matter (the default gate: every
column is either under the trigger, c = 1, or clamped to c_min). Otherwise the only difference
is the float32 log: torch's CPU log is MKL VML's vmsLn, the interpreter's is numpy's, and they
differ by up to 3 ulp; with torch.log swapped for numpy's the kernel is bit-identical again,
and without the swap the state stays within LOG_ULP_BOUND ulp (docs/kernels-memory.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trasmuon import reference as ref
from trasmuon_kernels.gate import kth_smallest
from trasmuon_kernels.testing import assert_close_to_reference, bitwise_twins, poison

from .with_rule import gate_stage_

# These check bit-exactness against the CPU reference under Triton's interpreter, on CPU
# tensors; on a GPU machine the compiled kernels' parity is bench/gpu_memory_passes.py's.
# Bit-equality with the eager twins holds only where trasmuon_kernels.testing.bitwise_twins()
# says so (Triton's interpreter with a tl.fma that rounds once, torch 2.11 / 2.13); elsewhere
# these tests are skipped with that reason (their compiled parity is bench/gpu_memory_passes.py's).
BITWISE, WHY_NOT_BITWISE = bitwise_twins()
needs_bitwise = pytest.mark.skipif(
    not BITWISE, reason=f"asserts bit-equality with eager twins, not guaranteed here: {WHY_NOT_BITWISE}")
pytestmark = [
    pytest.mark.skipif(
        torch.cuda.is_available(), reason="interpreter tests on CPU tensors; on a GPU run bench/gpu_memory_passes.py"
    ),
    needs_bitwise,
]

# Measured worst case 4 ulp (c_last, sf_c_lr2_sum) over the continuous-gate sequences below;
# a 3-ulp log difference moves c by at most ~6 ulp before the EMA divides it by 10.
LOG_ULP_BOUND = 8

DEFAULT_GATE = dict(
    warmup_steps=0, clip_period=4, clip_alpha=1.0, clip_min=0.7, clip_trigger=3.0,
    clip_beta=0.9, energy_beta=0.99, energy_quantile=0.5, energy_eps=1e-12,
    schedule_free=True, sf_mix=0.3,
)
STATE_KEYS = ("energy_ref", "c_ema", "sf_lr2_sum", "sf_c_lr2_sum", "c_last")


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 ulps (values of one sign, as every gate quantity is)."""
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert not torch.isnan(a).any() and not torch.isnan(b).any()
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max().item())


def _values(n: int, rows: int, seed: int) -> torch.Tensor:
    """Energies with ties, zeros and a spread of magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(rows, n, generator=gen) * torch.logspace(-3, 3, n)[torch.randperm(n, generator=gen)]
    v[:, ::5] = 0.0
    v[:, 1::7] = v[:, :1].clone()  # ties with the first value
    return v


# --------------------------------------------------------------------------------------
# k-th smallest
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_kth_every_rank_small(n):
    values = torch.tensor([[3.0, 1.0, 1.0, 0.0, 2.0, 1.0][:n], [0.0] * n, [5.0, -0.0, 7.0, 5.0, 0.0, 1e-40][:n]])
    for k in range(1, n + 1):
        got = kth_smallest(values, k, out=poison(3, dtype=torch.float32))
        assert torch.equal(got, ref.kth_smallest(values, k)), f"n={n} k={k}"


@pytest.mark.parametrize(
    "n,block", [(7, None), (129, None), (1000, None), (300, 64), (4097, None), (65536, None)]
)
def test_kth_sizes_ties_zeros(n, block):
    # 4097, 65536 and block=64 take the multi-block path (rows longer than a block).
    multi = n > (block or 4096)
    rows = 1 if multi else 3
    values = _values(n, rows, seed=n)
    if multi:  # each rank costs up to 32 passes over the row in the interpreter
        ranks = [ref.quantile_rank(n, 0.5), n]
    else:
        ranks = sorted({1, ref.quantile_rank(n, 0.5), ref.quantile_rank(n, 0.95), n})
    for k in ranks:
        got = kth_smallest(values, k, block=block, out=poison(rows, dtype=torch.float32))
        assert torch.equal(got, ref.kth_smallest(values, k)), f"n={n} k={k}"


def test_kth_special_values_and_strides():
    values = torch.tensor(
        [
            [float("inf"), 1e-45, 0.0, 3e38, 1e-38, 2.0, float("inf"), 1e-45],
            [-1.0, -0.0, 0.0, -5.0, 2.0, -1e-40, 7.0, -3.0],  # negatives order correctly too
            [float("nan"), 1.0, 2.0, float("nan"), 0.5, 4.0, 3.0, 1.5],  # NaN sorts last, as torch
        ]
    )
    for k in range(1, 9):
        got = kth_smallest(values, k)
        want = ref.kth_smallest(values, k)
        assert torch.equal(got[:2], want[:2]), f"k={k}"
        assert torch.equal(got[2].isnan(), want[2].isnan()) and (want[2].isnan() or got[2] == want[2])
    strided = _values(41, 4, seed=1).t().contiguous().t()  # column-major (4, 41)
    assert not strided.is_contiguous()
    assert torch.equal(kth_smallest(strided, 20), ref.kth_smallest(strided, 20))


def test_kth_errors():
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 4\]"):
        kth_smallest(torch.zeros(2, 4), 5)
    with pytest.raises(TypeError, match=r"values has dtype torch\.float64"):
        kth_smallest(torch.zeros(2, 4, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="values must be a 2D tensor"):
        kth_smallest(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="block must be a power of two"):
        kth_smallest(torch.zeros(2, 4), 1, block=3)


# --------------------------------------------------------------------------------------
# The gate stage over a run of steps
# --------------------------------------------------------------------------------------
def _energies(count: int, d_in: int, step: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    energy = torch.rand(count, d_in, generator=gen) * (1.0 + 0.2 * step)
    energy[:, ::4] = energy[:, :1].clone()  # ties at the quantile
    if d_in > 2:
        energy[:, 1] = 0.0
        burst = max(1, d_in // 16)  # bursty columns: far above the trigger
        energy[:, -burst:] *= 1e6 if step % 2 else 1e2
    return energy


def _run(count, d_in, steps, kwargs, *, lr=1e-3, device_scalars=False, seed=0):
    """Both implementations over ``steps`` steps; yields (t, kernel gate, reference gate,
    kernel state, reference state)."""
    sk: dict[str, torch.Tensor] = {}
    sr: dict[str, torch.Tensor] = {}
    for s in (sk, sr):
        ref.init_gate_state(s, (count,), d_in, kwargs["schedule_free"], torch.device("cpu"))
    first_flags = torch.ones(count, dtype=torch.bool)
    for t in range(1, steps + 1):
        energy = _energies(count, d_in, t, seed)
        lr_t = lr * (1.0 + 0.1 * t)  # a schedule: the accumulators see varying lr
        if device_scalars:
            step_arg = torch.tensor(float(t))  # the optimizer's float32 step counter
            lr_arg = torch.tensor(lr_t, dtype=torch.float32)
            extra = dict(first=first_flags)
        else:
            step_arg, lr_arg, extra = t, lr_t, {}
        e_cur = poison(count, dtype=torch.float32)
        got = gate_stage_(sk, energy, step_arg, lr_arg, **kwargs, **extra,
                          out=poison(count, d_in, dtype=torch.float32), energy_cur_out=e_cur)
        want = ref.gate_stage_(sr, energy, t, lr_arg, **kwargs)
        assert torch.equal(e_cur, ref.kth_smallest(energy, ref.quantile_rank(d_in, kwargs["energy_quantile"])))
        if device_scalars:
            assert not first_flags.any(), "the first-step flags were not consumed"
        yield t, got, want, sk, sr


GATE_CASES = [
    pytest.param(7, 129, {}, id="default-7x129"),
    pytest.param(1, 8, {}, id="default-1x8"),
    pytest.param(7, 2, dict(clip_period=1), id="2cols-period1"),
    pytest.param(3, 1, dict(clip_period=1), id="1col"),
    pytest.param(7, 33, dict(schedule_free=False), id="no-schedule-free"),
    pytest.param(3, 40, dict(warmup_steps=2, clip_period=3), id="warmup2-period3"),
    pytest.param(3, 40, dict(energy_quantile=0.9, sf_mix=1.0), id="q0.9-mix1"),
]


@pytest.mark.parametrize("device_scalars", [False, True], ids=["host-scalars", "device-scalars"])
@pytest.mark.parametrize("count,d_in,overrides", GATE_CASES)
def test_gate_bit_identical_to_reference(count, d_in, overrides, device_scalars):
    kwargs = {**DEFAULT_GATE, **overrides}
    fired = False
    for t, got, want, sk, sr in _run(count, d_in, 6, kwargs, device_scalars=device_scalars):
        assert torch.equal(got, want), f"step {t}: gate differs (max {max_ulp(got, want)} ulp)"
        for key in STATE_KEYS:
            if key in sr:
                assert torch.equal(sk[key], sr[key]), f"step {t}: state {key!r} differs"
        ratio = ref.energy_ratio(_energies(count, d_in, t, 0), sr["energy_ref"], kwargs["energy_eps"])
        fired |= bool((ratio > kwargs["clip_trigger"]).any()) and t > kwargs["warmup_steps"]
    if d_in > 2:
        assert fired, "the trigger never fired: the test would not exercise the clipped branch"
        assert (sr["c_ema"] < 1).any()


def test_gate_large_row():
    # 1 x 65536 energies: the selection loops over 16 register blocks.
    kwargs = dict(DEFAULT_GATE, clip_period=1)
    for t, got, want, sk, sr in _run(1, 65536, 2, kwargs):
        assert torch.equal(got, want), f"step {t}"
        assert torch.equal(sk["energy_ref"], sr["energy_ref"])
        assert torch.equal(sk["sf_c_lr2_sum"], sr["sf_c_lr2_sum"])


CONTINUOUS = dict(DEFAULT_GATE, clip_trigger=None, clip_min=0.05, clip_period=1, warmup_steps=1)


def _numpy_log(x: torch.Tensor) -> torch.Tensor:
    """float32 log as the interpreter computes it (numpy's float32 log)."""
    return torch.from_numpy(np.log(x.detach().cpu().numpy()))


@pytest.mark.parametrize("alpha,trigger", [(1.0, None), (3.0, None), (2.0, 0.5)])
def test_continuous_gate_log_bound(alpha, trigger, monkeypatch):
    kwargs = dict(CONTINUOUS, clip_alpha=alpha, clip_trigger=trigger)
    worst = 0
    for t, got, want, sk, sr in _run(7, 200, 4, kwargs, seed=1):
        worst = max(worst, max_ulp(got, want), *(max_ulp(sk[k], sr[k]) for k in STATE_KEYS))
        assert_close_to_reference(got, want.double(), what=f"gate at step {t}")
    assert worst <= LOG_ULP_BOUND
    # The log is the only difference: with numpy's float32 log in the reference, bit for bit.
    monkeypatch.setattr(torch, "log", _numpy_log)
    for t, got, want, sk, sr in _run(7, 200, 4, kwargs, seed=1):
        assert torch.equal(got, want), f"step {t}"
        for key in STATE_KEYS:
            assert torch.equal(sk[key], sr[key]), f"step {t}: {key}"


def test_first_flag_per_matrix():
    # Matrix 1 joins the bucket later: its E_ref starts at its own first gated step.
    kwargs = dict(DEFAULT_GATE, clip_period=1)
    sk: dict[str, torch.Tensor] = {}
    ref.init_gate_state(sk, (2,), 16, True, torch.device("cpu"))
    energy = _energies(2, 16, 1, 0)
    gate_stage_(sk, energy, 1, 1e-3, **kwargs, first=torch.tensor([True, True]))
    e1 = sk["energy_ref"].clone()
    flags = torch.tensor([False, True])
    energy2 = _energies(2, 16, 2, 0)
    gate_stage_(sk, energy2, 2, 1e-3, **kwargs, first=flags)
    e_cur = ref.kth_smallest(energy2, ref.quantile_rank(16, 0.5))
    assert sk["energy_ref"][1] == e_cur[1]  # re-initialized
    want0 = e1[:1].clone()
    ref.energy_ref_update_(want0, e_cur[:1], kwargs["energy_beta"])
    assert torch.equal(sk["energy_ref"][:1], want0)  # EMA, fma-exact
    assert not flags.any()


def test_deliberate_errors_are_caught():
    # A wrong quantile or a skipped EMA would be seen by the equality checks above.
    kwargs = dict(DEFAULT_GATE, clip_period=1)
    sk: dict[str, torch.Tensor] = {}
    sr: dict[str, torch.Tensor] = {}
    for s in (sk, sr):
        ref.init_gate_state(s, (3,), 40, True, torch.device("cpu"))
    energy = _energies(3, 40, 1, 0)
    gate_stage_(sk, energy, 1, 1e-3, **dict(kwargs, energy_quantile=0.75))
    ref.gate_stage_(sr, energy, 1, 1e-3, **kwargs)
    assert not torch.equal(sk["energy_ref"], sr["energy_ref"])
    got = gate_stage_(sk, _energies(3, 40, 2, 0), 2, 1e-3, **kwargs)
    want = ref.gate_stage_(sr, _energies(3, 40, 2, 0), 2, 1e-3, **kwargs)
    assert not torch.equal(got, want)


def test_gate_errors():
    kwargs = dict(DEFAULT_GATE)
    state: dict[str, torch.Tensor] = {}
    energy = torch.rand(2, 10)
    with pytest.raises(KeyError, match="c_ema"):
        gate_stage_(state, energy, 1, 1e-3, **kwargs)
    ref.init_gate_state(state, (2,), 10, True, torch.device("cpu"))
    with pytest.raises(TypeError, match=r"energy has dtype torch\.float64"):
        gate_stage_(state, energy.double(), 1, 1e-3, **kwargs)
    with pytest.raises(ValueError, match=r"state\['c_ema'\] has shape"):
        gate_stage_(state, torch.rand(2, 11), 1, 1e-3, **kwargs)
    with pytest.raises(TypeError, match="step must be an int"):
        gate_stage_(state, energy, 1.5, 1e-3, **kwargs)
    with pytest.raises(ValueError, match="lr must be a float or a one-element tensor"):
        gate_stage_(state, energy, 1, torch.ones(2), **kwargs)
    with pytest.raises(ValueError, match="first has shape"):
        gate_stage_(state, energy, 1, 1e-3, **kwargs, first=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="first must be a bool or integer tensor"):
        gate_stage_(state, energy, 1, 1e-3, **kwargs, first=torch.ones(2))
    with pytest.raises(ValueError, match="clip_period must be an int >= 1"):
        gate_stage_(state, energy, 1, 1e-3, **dict(kwargs, clip_period=0))
    with pytest.raises(ValueError, match="out has shape"):
        gate_stage_(state, energy, 1, 1e-3, **kwargs, out=torch.empty(2, 9))
    del state["sf_lr2_sum"]
    with pytest.raises(KeyError, match="sf_lr2_sum"):
        gate_stage_(state, energy, 1, 1e-3, **kwargs)


def test_trigger_boundary_is_inclusive():
    # r == trigger keeps c = 1 (docs/rule.md, step 10: c_j = 1 where r_j <= k); the next float above is clipped.
    energy = torch.ones(2, 9)
    energy[:, 3] = 3.0  # E_ref + eps == 1.0 in float32, so r = 3.0 exactly
    energy[:, 4] = torch.nextafter(torch.tensor(3.0), torch.tensor(4.0))
    energy[:, 5] = 2.0
    kwargs = dict(DEFAULT_GATE, clip_period=1, clip_beta=0.0, schedule_free=False)
    sk: dict[str, torch.Tensor] = {}
    sr: dict[str, torch.Tensor] = {}
    for s in (sk, sr):
        ref.init_gate_state(s, (2,), 9, False, torch.device("cpu"))
    got = gate_stage_(sk, energy, 1, 1e-3, **kwargs)
    want = ref.gate_stage_(sr, energy, 1, 1e-3, **kwargs)
    assert torch.equal(got, want)
    assert (got[:, 3] == 1.0).all() and (got[:, 5] == 1.0).all()
    assert (got[:, 4] == torch.tensor(kwargs["clip_min"])).all()


def test_per_matrix_steps():
    # A (B,) step tensor: every matrix moves on its own schedule, as if it ran alone.
    kwargs = dict(DEFAULT_GATE, clip_period=2, warmup_steps=1)
    count, d_in = 3, 24
    energy = _energies(count, d_in, 1, 0)
    start: dict[str, torch.Tensor] = {}
    ref.init_gate_state(start, (count,), d_in, True, torch.device("cpu"))
    start["energy_ref"] = energy.median(dim=-1).values
    start["c_ema"] = torch.rand(count, d_in, generator=torch.Generator().manual_seed(3)) * 0.3 + 0.7
    steps = torch.tensor([1, 2, 5], dtype=torch.int64)
    together = {k: v.clone() for k, v in start.items()}
    got = gate_stage_(together, energy, steps, 1e-3, first=False, **kwargs)
    for i in range(count):
        alone = {k: v[i : i + 1].clone() for k, v in start.items()}
        want = gate_stage_(alone, energy[i : i + 1], int(steps[i]), 1e-3, first=False, **kwargs)
        assert torch.equal(got[i : i + 1], want), f"matrix {i}"
        for key in STATE_KEYS:
            assert torch.equal(together[key][i : i + 1], alone[key]), f"matrix {i}: {key}"
    assert not torch.equal(got[0], got[2])  # warmup: matrix 0 is ungated at t = 1
    with pytest.raises(ValueError, match=r"a \(3,\) tensor"):
        gate_stage_(together, energy, torch.ones(2), 1e-3, first=False, **kwargs)

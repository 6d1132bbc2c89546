"""Multi-tensor AdamW (trasmuon_kernels.adamw) against ``reference.adamw_foreach_step_``: a float64
evaluation of the same inputs (the table's tolerance of each output's dtype), and the float32
eager step (what the eager backend computes).

Exactness: exp_avg and exp_avg_sq are bit-identical to the float32 eager step where
``trasmuon_kernels.testing.bitwise_twins()`` holds: under Triton's interpreter (its ``tl.fma``
rounding once, as in Triton 3.9), on the CPU, with torch 2.11 or 2.13 (ATen's fma-form lerp and
its fma'd addcmul; verified on both). Compiled on a GPU, torch's CUDA ops and the kernel may
contract or not contract to FMA differently, so there the moments are judged against float64
with the table (``assert_matches_twin``) and a TwinToleranceWarning says so. W agrees to float32
rounding: the bias corrections are computed on the device in float32 (the reference: in double
on the host).
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from trasmuon import reference as ref
from trasmuon_kernels._common import f32
from trasmuon_kernels._common import one_minus_pow as _one_minus_pow
from trasmuon_kernels._launch import H200, INTERPRETER, record_launches, run_all
from trasmuon_kernels.adamw import (
    AdamWConfig,
    adamw_config,
    adamw_step_,
    prepare_adamw,
)
from trasmuon_kernels.testing import assert_close_to_reference, assert_matches_twin, bitwise_twins

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CPU = DEVICE == "cpu"  # the interpreter: the eager step runs on the CPU too

# Odd, non-power-of-two sizes, full blocks and tails; each with its own step before the first
# update (1 = a first step from zero moments).
SHAPES = [(1,), (1, 1), (5,), (16,), (256,), (257,), (1000,), (2999,), (7, 129), (3, 5, 11), (2, 1, 33)]
STEP0 = [1, 1, 2, 3, 10, 1, 100, 1000, 12345, 7, 1_000_000]
BETAS = (0.9, 0.999)
EPS = 1e-8
DTYPES = [  # (param, grad)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]


def _state(shapes, param_dtype, grad_dtype, steps0, seed):
    gen = torch.Generator().manual_seed(seed)
    params, grads, ms, vs = [], [], [], []
    for shape, t0 in zip(shapes, steps0, strict=True):
        params.append(torch.randn(shape, generator=gen).to(param_dtype).to(DEVICE))
        grads.append(torch.randn(shape, generator=gen).to(grad_dtype).to(DEVICE))
        if t0 == 1:
            ms.append(torch.zeros(shape, device=DEVICE))
            vs.append(torch.zeros(shape, device=DEVICE))
        else:
            ms.append((torch.randn(shape, generator=gen) * 0.1).to(DEVICE))
            vs.append((torch.rand(shape, generator=gen) * 0.01).to(DEVICE))
    return params, grads, ms, vs


def _eager(params, grads, ms, vs, steps, lr, wd, betas=BETAS, eps=EPS, wide=None):
    """The reference step on copies: in float64 (``wide``) or in the tensors' own dtypes."""
    cast = (lambda t: t.to(wide).clone()) if wide is not None else (lambda t: t.clone())
    p, g = [cast(t) for t in params], [cast(t) for t in grads]
    states = [{"exp_avg": cast(m), "exp_avg_sq": cast(v)} for m, v in zip(ms, vs, strict=True)]
    ref.adamw_foreach_step_(p, g, states, steps, lr, betas=betas, eps=eps, weight_decay=wd)
    return p, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]


def _check(got, want, what):
    """Every element of W, m and v against ``want`` with the table's tolerance of each output's
    dtype (W's own; float32 for the moments)."""
    for name, outs, refs in zip(("param", "exp_avg", "exp_avg_sq"), got, want, strict=True):
        for i, (out, r) in enumerate(zip(outs, refs, strict=True)):
            assert_close_to_reference(out, r.double(), what=f"{what}: {name}[{i}] {tuple(out.shape)}")


def _kwargs(steps, lr, wd, betas=BETAS, eps=EPS, **extra):
    return dict(steps=steps, lr=lr, betas=betas, eps=eps, weight_decay=wd, **extra)


# --------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_replayed_steps_match_reference(dtypes, wd, lr_kind):
    """One prepared launch replayed for three steps; per-tensor steps and the lr tensor change
    in place between replays. Each step is judged against float64 and the float32 eager step
    from the same inputs."""
    param_dtype, grad_dtype = dtypes
    seed = DTYPES.index(dtypes) * 4 + int(wd > 0) * 2 + int(lr_kind == "tensor")
    params, grads, ms, vs = _state(SHAPES, param_dtype, grad_dtype, STEP0, seed)
    steps_t = torch.tensor(STEP0, dtype=torch.float32, device=DEVICE)
    lr = 1e-2 if lr_kind == "float" else torch.tensor(1e-2, device=DEVICE)
    block = (None, 256)[(wd > 0) != (lr_kind == "tensor")]  # both block sizes for every dtype
    launches = prepare_adamw(params, grads, ms, vs, **_kwargs(steps_t, lr, wd, block=block))
    assert len(launches) == 1
    gen = torch.Generator().manual_seed(100 + seed)
    for k in range(3):
        if k:  # the next step: new gradients in the same buffers, steps + 1, a new lr
            for g in grads:
                g.copy_(torch.randn(g.shape, generator=gen).to(g.dtype))
            steps_t += 1
            if lr_kind == "tensor":
                lr.fill_(1e-2 * (0.5 + k))
        steps = [t + k for t in STEP0]
        lr_value = float(lr)  # the float32 value for a tensor
        want64 = _eager(params, grads, ms, vs, steps, lr_value, wd, wide=torch.float64)
        want32 = _eager(params, grads, ms, vs, steps, lr, wd)
        run_all(launches)
        got = (params, ms, vs)
        _check(got, want64, f"step {k} vs float64")
        # The eager float32 step: the float32 tolerance for float32 outputs; half params get
        # their own (a float32 difference can flip the final rounding by one half ulp).
        _check(got, want32, f"step {k} vs float32 eager")
        # The moments against the float32 eager step: bitwise where guaranteed (see the module
        # docstring), else (compiled) the float64 check above is the judgement, with a warning.
        for j, name in ((1, "exp_avg"), (2, "exp_avg_sq")):
            for i, (out, r, r64) in enumerate(zip(got[j], want32[j], want64[j], strict=True)):
                assert_matches_twin(out, r, r64.double(), what=f"step {k}: {name}[{i}]")
        if bitwise_twins()[0]:
            if param_dtype != torch.float32:
                # W's float32 value is within a few ulp of the eager one, so its final rounding
                # agrees almost everywhere (a truncating bf16 cast would miss half the time).
                same = sum(int((p == r).sum()) for p, r in zip(params, want32[0], strict=True))
                assert same >= 0.99 * sum(p.numel() for p in params), f"step {k}: W rounding differs"


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.5), (0.0, 0.0), (0.95, 0.9999)], ids=str)
@pytest.mark.parametrize("step", [1, 50])
def test_int_steps_and_betas(betas, step):
    """``steps`` as an int for all tensors; b1 >= 0.5 and < 0.5 take the two lerp forms, and
    b = 0 has no bias correction at all."""
    shapes = [(3,), (130,), (5, 7)]
    params, grads, ms, vs = _state(shapes, torch.bfloat16, torch.bfloat16, [step] * 3, seed=step)
    lr = torch.tensor(3e-3, device=DEVICE)
    want64 = _eager(params, grads, ms, vs, [step] * 3, float(lr), 0.05, betas=betas, wide=torch.float64)
    want32 = _eager(params, grads, ms, vs, [step] * 3, lr, 0.05, betas=betas)
    adamw_step_(params, grads, ms, vs, **_kwargs(step, lr, 0.05, betas=betas))
    _check((params, ms, vs), want64, "vs float64")
    _check((params, ms, vs), want32, "vs float32 eager")


@pytest.mark.parametrize("beta2", [0.95, 0.999, 0.9999])
def test_bias_correction_accuracy(beta2):
    """W = 0 and no decay: W_new is minus the update itself, so the float32 bias corrections are
    judged to float32 tolerance (1 - b2^t in float32 by subtraction would be 2^-24/(1 - b2)
    off at t = 1: 1.7e-4 for b2 = 0.9999, far outside)."""
    steps0 = [1, 2, 3, 10, 100, 1000, 10_000, 100_000, 2**24]
    shapes = [(64,)] * len(steps0)
    params, grads, ms, vs = _state(shapes, torch.float32, torch.float32, steps0, seed=7)
    for p in params:
        p.zero_()
    steps_t = torch.tensor(steps0, dtype=torch.float32, device=DEVICE)
    want64 = _eager(params, grads, ms, vs, steps0, 1e-2, 0.0, betas=(0.9, beta2), wide=torch.float64)
    adamw_step_(params, grads, ms, vs, **_kwargs(steps_t, 1e-2, 0.0, betas=(0.9, beta2)))
    for i, (p, want) in enumerate(zip(params, want64[0], strict=True)):
        assert_close_to_reference(p, want, what=f"update at t={steps0[i]}")


@triton.jit
def _one_minus_pow_kernel(t_ptr, out_ptr, n, log_b, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(t_ptr + offs, mask=mask, other=1.0)
    tl.store(out_ptr + offs, _one_minus_pow(log_b, t), mask=mask)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9, 0.95, 0.999, 0.9999, 0.999999])
def test_one_minus_pow(beta):
    """The device's 1 - b^t against double for t = 1..10^7: within 4 float32 ulp under the
    interpreter (measured: 2.9), the table's float32 tolerance elsewhere (the GPU's exp is
    approximate)."""
    ts = [torch.arange(1, 200), torch.logspace(0, 7, 300).round()]
    if 0 < beta:  # around the switch from the series to 1 - exp, |t ln b| = 0.5
        switch = int(0.5 / -math.log(beta))
        ts.append(torch.arange(max(1, switch - 3), switch + 4))
    ts = torch.unique(torch.cat(ts).double())
    want = torch.tensor([1.0 - beta ** int(t) for t in ts.tolist()], dtype=torch.float64)
    out = torch.empty(ts.numel(), device=DEVICE)
    log_b = f32(math.log(beta)) if beta > 0 else -math.inf
    _one_minus_pow_kernel[(1,)](ts.float().to(DEVICE), out, ts.numel(), log_b, BLOCK=1024)
    assert_close_to_reference(out, want, what="1 - b^t")
    if ON_CPU:
        rel = ((out.cpu().double() - want).abs() / want).max().item()
        assert rel <= 4 * 2**-24, f"1 - b^t off by {rel / 2**-24:.2f} ulp"


def test_every_element_written_and_nothing_else():
    """Tensors carved out of flat buffers with guard gaps (and a tensor left out of the launch):
    every element of every tensor in the launch changes and matches the reference; the gaps
    and the left-out tensor are untouched. The odd offsets also take the unaligned path."""
    shapes = [(1,), (63,), (64,), (65,), (7, 19), (3, 4, 5)]
    gap = 3
    total = sum(math.prod(s) + gap for s in shapes) + gap
    sentinel = 1024.0  # exact in every dtype

    def carve(dtype, fill):
        buf = torch.full((total,), sentinel, dtype=dtype, device=DEVICE)
        out, off = [], gap
        for s in shapes:
            n = math.prod(s)
            out.append(buf[off:off + n].view(s))
            out[-1].copy_(fill(s).to(dtype))
            off += n + gap
        return buf, out

    gen = torch.Generator().manual_seed(3)
    buf_p, params = carve(torch.bfloat16, lambda s: torch.randn(s, generator=gen))
    buf_g, grads = carve(torch.bfloat16, lambda s: torch.randn(s, generator=gen))
    buf_m, ms = carve(torch.float32, lambda s: torch.randn(s, generator=gen) * 0.1)
    buf_v, vs = carve(torch.float32, lambda s: torch.rand(s, generator=gen) * 0.01)
    gaps = torch.ones(total, dtype=torch.bool)
    off = gap
    for s in shapes:
        gaps[off:off + math.prod(s)] = False
        off += math.prod(s) + gap
    # The last tensor of each list stays out of the launch.
    keep = [t.clone() for t in (params[-1], grads[-1], ms[-1], vs[-1])]
    inp = (params[:-1], grads[:-1], ms[:-1], vs[:-1])
    before_m, before_v = [m.clone() for m in ms], [v.clone() for v in vs]
    steps = [5] * (len(shapes) - 1)
    want = _eager(*inp, steps, 1e-2, 0.1, wide=torch.float64)
    launches = prepare_adamw(*inp, **_kwargs(5, 1e-2, 0.1, block=64))
    assert launches[0].meta["ALIGNED"] is False
    run_all(launches)
    _check((params[:-1], ms[:-1], vs[:-1]), want, "carved tensors")
    for i in range(len(shapes) - 1):
        assert (ms[i] != before_m[i]).all(), f"exp_avg[{i}] has unwritten elements"
        assert (vs[i] != before_v[i]).all(), f"exp_avg_sq[{i}] has unwritten elements"
    for name, buf in (("params", buf_p), ("grads", buf_g), ("exp_avgs", buf_m), ("exp_avg_sqs", buf_v)):
        assert (buf.cpu()[gaps] == sentinel).all(), f"{name}: a write outside the tensors"
    for t, k in zip((params[-1], grads[-1], ms[-1], vs[-1]), keep, strict=True):
        assert torch.equal(t, k), "a tensor outside the launch changed"


# --------------------------------------------------------------------------------------
# Prepared launches
# --------------------------------------------------------------------------------------
def test_replay_equals_calls_and_one_launch():
    shapes = SHAPES
    lr = torch.tensor(2e-3, device=DEVICE)
    steps_t = torch.tensor(STEP0, dtype=torch.float32, device=DEVICE)
    a = _state(shapes, torch.bfloat16, torch.float32, STEP0, seed=11)
    b = tuple([t.clone() for t in lst] for lst in a)
    kw = _kwargs(steps_t, lr, 0.1, block=256)

    launches = prepare_adamw(*a, **kw)
    assert len(launches) == 1
    with record_launches() as first:
        run_all(launches)
    with record_launches() as second:
        run_all(launches)
    with record_launches() as calls:
        adamw_step_(*b, **kw)
        adamw_step_(*b, **kw)
    for x, y in zip(a, b, strict=True):
        for i, (tx, ty) in enumerate(zip(x, y, strict=True)):
            assert torch.equal(tx, ty), f"tensor {i}: two replays differ from two calls"
    assert first == second, "two replays issued different launches"
    assert len(first) == 1 and first[0].name == "adamw"
    assert first[0].grid == (sum(math.ceil(math.prod(s) / 256) for s in shapes),)
    assert len(calls) == 2  # one launch per step for all N tensors


def test_empty_inputs():
    assert prepare_adamw([], [], [], [], **_kwargs(1, 1e-3, 0.0)) == []
    empty = [torch.empty(0, 3, device=DEVICE)]
    assert prepare_adamw(empty, empty, [torch.empty(0, 3, device=DEVICE)], [torch.empty(0, 3, device=DEVICE)],
                         **_kwargs(1, 1e-3, 0.0)) == []
    # Empty tensors among others take no program.
    shapes = [(0,), (9,), (0, 4)]
    params, grads, ms, vs = _state(shapes, torch.float32, torch.float32, [2, 2, 2], seed=1)
    want = _eager(params, grads, ms, vs, [2, 2, 2], 1e-3, 0.0, wide=torch.float64)
    launches = prepare_adamw(params, grads, ms, vs, **_kwargs(2, 1e-3, 0.0))
    assert launches[0].grid == (1,)
    run_all(launches)
    _check((params, ms, vs), want, "with empty tensors")


def test_config():
    big = [50_000 * 1024, 1024, 3]
    assert adamw_config(big, H200) == AdamWConfig(4096, 8, maxnreg=128)  # two blocks per SM
    assert adamw_config([768] * 200, H200) == AdamWConfig(1024, 4)  # 200 programs < 4 per SM
    assert adamw_config([300_000], H200) == AdamWConfig(2048, 4)
    assert adamw_config([1, 2, 3], H200) == AdamWConfig(512, 4)
    assert adamw_config([3000, 7], INTERPRETER) == AdamWConfig(4096, 8)
    assert adamw_config([10**7], INTERPRETER).block == 65536
    assert adamw_config(big, H200) == adamw_config(list(big), H200)  # a pure function of sizes
    # The GPU's config runs under the interpreter too (same results).
    params, grads, ms, vs = _state([(1500,), (3,)], torch.float32, torch.float32, [4, 4], seed=2)
    want = _eager(params, grads, ms, vs, [4, 4], 1e-3, 0.1, wide=torch.float64)
    launches = prepare_adamw(params, grads, ms, vs, **_kwargs(4, 1e-3, 0.1, props=H200))
    assert launches[0].meta["BLOCK"] == 2048 and launches[0].meta["num_warps"] == 4
    assert launches[0].meta["ALIGNED"] is True
    run_all(launches)
    _check((params, ms, vs), want, "H200 config")


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------
def _valid():
    params, grads, ms, vs = _state([(4,), (2, 3), (5,)], torch.float32, torch.bfloat16, [2, 2, 2], seed=0)
    return dict(
        params=params, grads=grads, exp_avgs=ms, exp_avg_sqs=vs,
        steps=torch.full((3,), 2.0, device=DEVICE), lr=1e-3, betas=BETAS, eps=EPS, weight_decay=0.0,
    )


def _set(key, index, value):
    def edit(kw):
        kw[key] = list(kw[key])
        kw[key][index] = value(kw[key][index]) if callable(value) else value
    return edit


def _put(key, value):
    def edit(kw):
        kw[key] = value(kw[key]) if callable(value) else value
    return edit


BAD_INPUTS = [
    ("params-not-list", _put("params", lambda p: p[0]), TypeError, r"params must be a list"),
    ("grads-length", _put("grads", lambda g: g[:2]), ValueError, r"grads has 2 tensors, but params has 3"),
    ("exp_avgs-length", _put("exp_avgs", lambda m: m[:1]), ValueError, r"exp_avgs has 1 tensors"),
    ("grads-item", _set("grads", 1, 1.0), TypeError, r"grads\[1\] is a float, not a tensor"),
    ("params-dtype", _put("params", lambda p: [t.double() for t in p]), TypeError, r"params\[0\] has dtype torch.float64"),
    ("params-mixed", _set("params", 2, lambda t: t.bfloat16()), TypeError, r"params\[2\] has dtype torch.bfloat16, but params\[0\]"),
    ("grads-dtype", _put("grads", lambda g: [t.int() for t in g]), TypeError, r"grads\[0\] has dtype torch.int32"),
    ("grads-mixed", _set("grads", 1, lambda t: t.float()), TypeError, r"grads\[1\] has dtype torch.float32"),
    ("exp_avgs-dtype", _put("exp_avgs", lambda m: [t.bfloat16() for t in m]), TypeError, r"exp_avgs\[0\] has dtype torch.bfloat16"),
    ("exp_avg_sqs-dtype", _set("exp_avg_sqs", 0, lambda t: t.half()), TypeError, r"exp_avg_sqs\[0\] has dtype torch.float16"),
    ("grads-shape", _set("grads", 1, lambda t: t.reshape(3, 2)), ValueError, r"grads\[1\] has shape \(3, 2\), but params\[1\] has shape \(2, 3\)"),
    ("exp_avgs-shape", _set("exp_avgs", 2, lambda t: t[:4]), ValueError, r"exp_avgs\[2\] has shape \(4,\)"),
    ("exp_avg_sqs-shape", _set("exp_avg_sqs", 0, lambda t: t[None]), ValueError, r"exp_avg_sqs\[0\] has shape \(1, 4\)"),
    ("params-contiguous", _set("params", 1, lambda t: t.mT.contiguous().mT), ValueError, r"params\[1\] is not contiguous"),
    ("grads-contiguous", _set("grads", 1, lambda t: t.mT.contiguous().mT), ValueError, r"grads\[1\] is not contiguous"),
    ("exp_avg_sqs-contiguous", _set("exp_avg_sqs", 1, lambda t: t.mT.contiguous().mT), ValueError, r"exp_avg_sqs\[1\] is not contiguous"),
    ("params-device", _put("params", lambda p: [t.to("meta") for t in p]), RuntimeError, r"params\[0\] is on meta"),
    ("grads-device", _set("grads", 2, lambda t: t.to("meta")), ValueError, r"grads\[2\] is on meta"),
    ("exp_avgs-device", _set("exp_avgs", 1, lambda t: t.to("meta")), ValueError, r"exp_avgs\[1\] is on meta"),
    ("aliased", lambda kw: kw.update(exp_avg_sqs=kw["exp_avgs"]), ValueError, r"exp_avg_sqs\[0\] is the same memory as exp_avgs\[0\]"),
    ("steps-shape", _put("steps", lambda s: s[:2]), ValueError, r"steps has shape \(2,\); expected \(3,\)"),
    ("steps-dtype", _put("steps", lambda s: s.long()), TypeError, r"steps has dtype torch.int64"),
    ("steps-device", _put("steps", lambda s: s.to("meta")), ValueError, r"steps is on meta"),
    ("steps-contiguous", _put("steps", lambda s: torch.stack([s, s], 1)[:, 0]), ValueError, r"steps is not contiguous"),
    ("steps-zero", _put("steps", 0), ValueError, r"steps must be a 1-based step count"),
    ("steps-bool", _put("steps", True), TypeError, r"steps must be an int or a float32 device tensor"),
    ("steps-float", _put("steps", 2.0), TypeError, r"steps must be an int"),
    ("lr-shape", _put("lr", lambda _: torch.ones(2, device=DEVICE)), ValueError, r"lr must be a float or a one-element tensor"),
    ("lr-dtype", _put("lr", lambda _: torch.ones((), dtype=torch.int64, device=DEVICE)), TypeError, r"lr tensor must be floating point"),
    ("lr-device", _put("lr", lambda _: torch.ones((), device="meta")), ValueError, r"lr is on meta"),
    ("lr-type", _put("lr", "0.1"), TypeError, r"lr must be a float"),
    ("betas-length", _put("betas", (0.9,)), TypeError, r"betas must be a pair"),
    ("betas-range", _put("betas", (0.9, 1.0)), ValueError, r"betas\[1\] must be in \[0, 1\)"),
    ("betas-type", _put("betas", ("0.9", 0.9)), TypeError, r"betas\[0\] must be a float"),
    ("eps-negative", _put("eps", -1e-8), ValueError, r"eps must be >= 0"),
    ("weight_decay-type", _put("weight_decay", None), TypeError, r"weight_decay must be a float"),
    ("weight_decay-nan", _put("weight_decay", float("nan")), ValueError, r"weight_decay must be finite"),
    ("block-pow2", lambda kw: kw.update(block=100), ValueError, r"block must be None or a power of two"),
    ("block-small", lambda kw: kw.update(block=8), ValueError, r"block must be None or a power of two"),
    ("props-type", lambda kw: kw.update(props="cuda"), TypeError, r"props must be a DeviceProps"),
]


@pytest.mark.parametrize("edit,exc,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_input_checks(edit, exc, match):
    kw = _valid()
    edit(kw)
    with record_launches() as records, pytest.raises(exc, match=match):
        adamw_step_(**kw)
    assert records == [], "a launch was issued before the check"

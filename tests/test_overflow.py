"""Huge but finite gradients never give non-finite weights or state (docs/usage.md, "Huge
gradients").

Every optimizer class, on both backends, with float32 and bf16 params, takes one gradient of
entries up to 1e20, 1e30 or float32 max / 4 among normal ones. Sums of squares overflow
float32 at all three (as a column energy, ||G||_F^2 or ||X||_F^2; AdamW's (1-b2) g^2 from
1e30). After the huge step and after the normal steps that follow it, the weights and every
state tensor are finite, and the two backends agree as tests/test_fused_backend.py holds
them to: the distance between their weights relative to the distance moved. Also: the eager
Newton-Schulz past overflow, saturation itself, and a row-sharded matrix on two ranks (the
Triton rare path must scale the assembled matrix, not each rank's rows on their own).
"""

import pytest
import torch

from trasmuon import NAMO, NAMOD, AdamW, Muon, NorMuon, TrasMuon
from trasmuon import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32_MAX = torch.finfo(torch.float32).max
HUGE = [1e20, 1e30, F32_MAX / 4]
HUGE_IDS = ["1e20", "1e30", "max/4"]
HUGE_STEP, STEPS = 2, 4
CLASSES = [TrasMuon, NorMuon, Muon, NAMO, NAMOD, AdamW]
# Every class, dtype and magnitude would take minutes under the interpreter: max / 4 runs
# with float32 params only.
CASES = [(cls, dtype, magnitude) for cls in CLASSES
         for dtype in (torch.float32, torch.bfloat16) for magnitude in HUGE
         if dtype == torch.float32 or magnitude != HUGE[-1]]

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def make_params(dtype):
    gen = torch.Generator().manual_seed(0)
    # A matrix and a vector (AdamW); tall matrices' rare path is in tests/kernels.
    shapes = [(8, 12), (7,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, dtype)) for s in shapes]


def gradients(params, magnitude):
    gen = torch.Generator().manual_seed(1)
    out = []
    for step in range(1, STEPS + 1):
        scale = magnitude if step == HUGE_STEP else 1.0
        # Clamped so that even max / 4 stays finite; bf16 keeps it finite too.
        out.append([(torch.randn(p.shape, generator=gen).clamp(-1, 1) * scale).to(DEVICE, p.dtype)
                    for p in params])
    return out


def assert_finite(opt, params, what):
    for p in params:
        assert torch.isfinite(p).all(), f"{what}: weight {tuple(p.shape)}"
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all(), f"{what}: state {key} of {tuple(p.shape)}"


def rel_to_moved(p, q, p0):
    p, q, p0 = p.detach().double(), q.detach().double(), p0.double()
    return ((p - q).norm() / (p - p0).norm()).item()


@pytest.mark.parametrize("cls, dtype, magnitude", CASES, ids=[
    f"{c.__name__}-{str(d)[6:]}-{HUGE_IDS[HUGE.index(m)]}" for c, d, m in CASES])
def test_huge_gradient_keeps_weights_and_state_finite(cls, dtype, magnitude):
    runs = {}
    for backend in ("eager", "triton"):
        params = make_params(dtype)
        # clip_period 1: TrasMuon's gate reads the saturated energies at every step. 2 NS
        # steps keep the interpreter fast (the rare path is in the first one).
        kw = {"clip_period": 1} if cls is TrasMuon else {}
        if cls is not AdamW:
            kw["ns_steps"] = 2
        opt = cls(params, lr=5e-2, weight_decay=0.01, backend=backend, check_finite=False, **kw)
        for step, grads in enumerate(gradients(params, magnitude), start=1):
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            if step >= HUGE_STEP:
                assert_finite(opt, params, f"{backend}, step {step}")
        runs[backend] = params
    for p, q, p0 in zip(runs["eager"], runs["triton"], make_params(dtype), strict=True):
        # bf16 params: AdamW's jump after a huge step is rounded to a few bits of itself.
        bound = 2e-2 if dtype == torch.float32 else 6e-2
        assert rel_to_moved(p, q, p0) < bound, (tuple(p.shape), rel_to_moved(p, q, p0))


@pytest.mark.parametrize("magnitude", HUGE, ids=HUGE_IDS)
def test_eager_newton_schulz_is_scale_invariant_past_overflow(magnitude):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 9, 14, generator=gen).clamp(-1, 1) * magnitude).to(torch.bfloat16)
    amax = x.float().abs().amax((-2, -1), keepdim=True)
    down = (x.float() * torch.ldexp(torch.ones_like(amax), 2 - torch.frexp(amax).exponent))
    down = down.to(torch.bfloat16)
    schedule = ref.ns_schedule(ref.TRASMUON_NS_COEFFICIENTS, 5)
    got = ref.newton_schulz(x, schedule, 1e-8, cpu_products="emulated")
    assert torch.equal(got, ref.newton_schulz(down, schedule, 1e-8, cpu_products="emulated"))
    truth = ref.newton_schulz(x.double(), schedule, 1e-8, torch.float64)
    assert ((got.double() - truth).norm() / truth.norm()).item() < 2e-2


def test_sums_of_squares_saturate_and_keep_finite_values():
    values = torch.tensor([0.0, 1.5, F32_MAX, float("inf")])
    assert torch.equal(ref.saturate(values), torch.tensor([0.0, 1.5, F32_MAX, F32_MAX]))
    assert ref.column_energy(torch.full((3, 2), 1e30)).eq(F32_MAX).all()
    v = torch.tensor([1.0, F32_MAX])
    ref.second_moment_update_(v, torch.tensor([F32_MAX, F32_MAX]), 0.5)
    assert torch.isfinite(v).all() and v[1] == F32_MAX


def _sharded_worker(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from trasmuon import DistributedNorMuon

    mesh = init_device_mesh("cpu", (world,))
    w0 = torch.randn(7, 10, generator=torch.Generator().manual_seed(0))
    p = torch.nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(0)]))
    q = torch.nn.Parameter(w0.clone())
    kw = dict(lr=5e-2, ns_steps=2, backend="triton")
    opt, single = DistributedNorMuon([p], **kw), NorMuon([q], **kw)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 4):
        g = torch.randn(7, 10, generator=gen)
        if step == 2:  # rank 0's rows overflow ||X||^2, the last rows alone would not
            g[:4] *= 1e30
            g[4:] *= 1e15
        p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        q.grad = g.clone()
        opt.step()
        single.step()
        full = p.full_tensor()
        assert torch.isfinite(full).all()
        # Each rank's rows must not be scaled on their own: the owner normalizes the whole
        # assembled X (a shard-local power of two would distort it by orders of magnitude).
        assert rel_to_moved(full, q, w0) < 2e-2, (step, rel_to_moved(full, q, w0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton under the interpreter on CPU ranks")
def test_row_sharded_matrices_are_scaled_as_a_whole(tmp_path):
    from tests.test_distributed import run_workers

    run_workers(_sharded_worker, 2, tmp_path)

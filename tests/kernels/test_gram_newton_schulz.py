"""Gram Newton–Schulz: the eager reference (``reference.gram_newton_schulz``) against the
standard iteration, and the Triton launcher (``trasmuon_kernels.gram_newton_schulz``) against
the float64 Gram reference with the one tolerance table (``trasmuon_kernels.testing``).

Gram and standard are the same polynomial of X: in float64 they agree to rounding. In bf16
and fp16 each is judged against float64 with the table's chain bound ``fro``. Outputs are
poisoned (NaN) before a kernel writes them. Shapes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

import trasmuon.reference as ref
from trasmuon_kernels import gram_newton_schulz as gns
from trasmuon_kernels.gram import GramConfig
from trasmuon_kernels.ns_apply import ApplyConfig
from trasmuon_kernels.testing import (
    TOLERANCES,
    assert_bitwise_equal,
    assert_close_to_reference,
    poison,
    relative_fro_error,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-7
SCHEDULE = ref.ns_schedule(ref.TRASMUON_NS_COEFFICIENTS, 5)
MUON = ref.ns_schedule(ref.MUON_NS_COEFFICIENTS, 5)
SHAPES = [(12, 40), (40, 12), (1, 33), (33, 1), (3, 9, 37), (2, 2, 17, 23), (20, 20)]


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ill_conditioned(s, long, seed):
    """s x long with singular values from 1 down to 1e-3 (a momentum-like spectrum)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(long, s, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(s, s, generator=g, dtype=torch.float64))
    return (v * torch.logspace(0, -3, s, dtype=torch.float64)) @ u.T


# --------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("restarts", [(), (2,), (1, 3), (4,), (9,)])
@pytest.mark.parametrize("shape", SHAPES)
def test_float64_gram_equals_standard(shape, restarts):
    x = randn(shape, 1)
    for schedule in (SCHEDULE, MUON):
        std = ref.newton_schulz(x, schedule, EPS, torch.float64)
        gram = ref.gram_newton_schulz(x, schedule, EPS, torch.float64, restarts=restarts)
        assert gram.shape == x.shape and gram.dtype == torch.float64
        assert relative_fro_error(gram, std) <= TOLERANCES[torch.float64].fro


def test_segments():
    assert ref.gram_segments(5, (2,)) == gns.gram_segments(5, (2,)) == (2, 3)
    for steps in range(0, 7):
        for restarts in ((), (2,), (1, 3), (3, 1, 3), (0, 5, 9)):
            segs = ref.gram_segments(steps, restarts)
            assert segs == gns.gram_segments(steps, restarts)
            assert sum(segs) == steps and all(s > 0 for s in segs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (3, 9, 37), (1, 33)])
def test_low_precision_gram_reference_within_the_table(shape, dtype):
    x = randn(shape, 2)
    truth = ref.gram_newton_schulz(x.to(dtype).double(), SCHEDULE, EPS, torch.float64)
    out = ref.gram_newton_schulz(x.float(), SCHEDULE, EPS, dtype)
    assert out.dtype == dtype
    assert relative_fro_error(out, truth) <= TOLERANCES[dtype].fro


def test_zero_matrix_gives_zeros():
    out = ref.gram_newton_schulz(torch.zeros(2, 5, 9), SCHEDULE, EPS)
    assert torch.equal(out.float(), torch.zeros(2, 5, 9))


def test_the_restart_bounds_the_drift_of_r():
    """Why the restart exists. In bf16, R (updated as P R P) drifts from X X^T, X = Q X0 the
    iterate it stands for: P and R commute only in exact arithmetic. On a momentum-like
    spectrum (singular values down to 1e-3, whose polynomial is still steep after a few
    steps) the drift after 4 steps exceeds R itself without a restart, and O is garbage;
    with the default restart after step 2, R is recomputed from X and O stays near float64."""
    x = ill_conditioned(16, 64, 3)
    truth = ref.newton_schulz(x, SCHEDULE, EPS, torch.float64)
    drift, err = {}, {}
    for restarts in ((), ref.DEFAULT_NS_RESTARTS):
        seen = {}

        def observe(step, r, q, x0, seen=seen):
            if step == 3:  # R after step 4 (0-based 3): the segment's last step is later
                y = q.double() @ x0.double()
                true_r = y @ y.mT
                seen["drift"] = ((r.double() - true_r).norm() / true_r.norm()).item()

        out = ref.gram_newton_schulz(x, SCHEDULE, EPS, torch.bfloat16, restarts=restarts,
                                     observe=observe)
        drift[restarts], err[restarts] = seen["drift"], relative_fro_error(out, truth)
    assert drift[()] > 1.0 and err[()] > 10.0  # measured: 2.7 and 95
    assert drift[(2,)] < 0.1 and err[(2,)] < 0.3  # measured: 0.06 and 0.14
    # (the standard bf16 iteration on this input: about 0.1 from float64: its smallest
    # singular values have not converged after 5 steps in either form)


def test_flop_model_and_the_switch():
    # 5 steps, restart after 2: 6 s^2 l + 23 s^3 against 15 s^2 l + 5 s^3 (leading terms).
    assert not ref.uses_gram("gram", (768, 768), 5, (2,))
    assert ref.uses_gram("gram-always", (768, 768), 5, (2,))
    assert ref.uses_gram("gram", (768, 3072), 5, (2,)) and ref.uses_gram("gram", (3072, 768), 5, (2,))
    assert not ref.uses_gram("gram", (768, 1400), 5, (2,))
    assert not ref.uses_gram("standard", (8, 4096), 5, (2,))
    s, long = 64, 256
    std = ref.newton_schulz_flops(s, long, 5)
    assert std == 5 * (s * (s + 1) * long + s * s * (s + 1) + 2 * s * s * long)
    gram = ref.newton_schulz_flops(s, long, 5, gram=True, restarts=(2,))
    assert gram == 2 * (s * (s + 1) * long + 2 * s * s * long) + 5 * s * s * (s + 1) + 3 * 6 * s**3
    with pytest.raises(ValueError, match="ns_method"):
        ref.uses_gram("fast", (4, 4), 5, ())


# --------------------------------------------------------------------------------------
# The Triton launcher
# --------------------------------------------------------------------------------------
def run(x, schedule=SCHEDULE, restarts=(2,), **kw):
    out = poison(*x.shape, dtype=torch.bfloat16, device=x.device)
    return gns.gram_newton_schulz(x, schedule, EPS, restarts=restarts, out=out, **kw)


@pytest.mark.parametrize("restarts", [(2,), ()])
@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (1, 33), (33, 1), (3, 9, 37), (2, 2, 17, 23)])
def test_triton_against_the_float64_gram_reference(shape, restarts):
    x = randn(shape, 4).float().to(DEVICE)
    rsq = poison(*shape[:-1], dtype=torch.float32, device=DEVICE)
    out = run(x, restarts=restarts, row_sumsq_out=rsq)
    truth = ref.gram_newton_schulz(x.to(torch.bfloat16).double().cpu(), SCHEDULE, EPS,
                                   torch.float64, restarts=restarts)
    assert relative_fro_error(out, truth) <= TOLERANCES[torch.bfloat16].fro
    # The row sums of squares of the bf16 O it returned, reduced in the last epilogue.
    assert_close_to_reference(rsq, ref.row_sumsq(out.double().cpu(), torch.float64),
                              dtype=torch.float32, what="row_sumsq_out")


def test_triton_small_tiles_restarts_and_given_norm():
    """Several tiles per matrix (the mirror, partial edge tiles, several column tiles of the
    row sums), two restarts (the spare/out ping-pong), a bf16 input with ``fro_sumsq`` given."""
    x = randn((2, 21, 50), 5).to(torch.bfloat16).to(DEVICE)
    fro = x.float().square().sum(dim=(-2, -1))
    g16, a16 = GramConfig(16, 16, 4, 1), ApplyConfig(16, 16, 16, 2, 4, 1)
    cfg = gns.GramNSConfig(gram=g16, poly=g16, apply=a16, square=a16)
    rsq = poison(2, 21, dtype=torch.float32, device=DEVICE)
    out = run(x, restarts=(1, 3), fro_sumsq=fro, config=cfg, row_sumsq_out=rsq)
    truth = ref.gram_newton_schulz(x.double().cpu(), SCHEDULE, EPS, torch.float64, restarts=(1, 3))
    assert relative_fro_error(out, truth) <= TOLERANCES[torch.bfloat16].fro
    assert_close_to_reference(rsq, ref.row_sumsq(out.double().cpu(), torch.float64),
                              dtype=torch.float32, what="row_sumsq_out")
    # The same launches again, through a preallocated workspace and as a replay: same bits.
    ws = gns.gram_newton_schulz_workspace(x.shape, DEVICE, steps=5, restarts=(1, 3), config=cfg)
    prepared = gns.prepare_gram_newton_schulz(x, SCHEDULE, EPS, restarts=(1, 3), fro_sumsq=fro,
                                              config=cfg, workspace=ws,
                                              out=poison(*x.shape, dtype=torch.bfloat16, device=DEVICE))
    for _ in range(2):
        for launch in prepared:
            launch()
        assert_bitwise_equal(prepared.result, out, what="replay with a workspace")


def test_add_identity_is_exact():
    z = randn((3, 37, 37), 6).to(torch.bfloat16).to(DEVICE)
    out = poison(3, 37, 37, dtype=torch.bfloat16, device=DEVICE)
    for launch in gns.prepare_add_identity(z, out, 2.8366, block=16):
        launch()
    want = (z.float() + 2.8366 * torch.eye(37, device=DEVICE)).to(torch.bfloat16)
    assert_bitwise_equal(out, want, what="a I + Z")


def test_zero_steps_and_zero_matrix():
    x = randn((4, 9), 7).float().to(DEVICE)
    out = run(x, schedule=())
    truth = ref.newton_schulz(x.to(torch.bfloat16).double().cpu(), (), EPS, torch.float64)
    assert_close_to_reference(out, truth, dtype=torch.bfloat16)
    assert torch.equal(run(torch.zeros(2, 5, 9, device=DEVICE)).float(),
                       torch.zeros(2, 5, 9, device=DEVICE))


def test_bad_arguments():
    x = torch.randn(4, 9, device=DEVICE)
    with pytest.raises(TypeError, match="restarts"):
        gns.gram_newton_schulz(x, SCHEDULE, EPS, restarts=(0,))
    with pytest.raises(TypeError, match="restarts"):
        gns.gram_newton_schulz(x, SCHEDULE, EPS, restarts=2)
    with pytest.raises(ValueError, match="out"):
        gns.gram_newton_schulz(x, SCHEDULE, EPS, out=torch.empty(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="share memory"):
        xb = x.to(torch.bfloat16)
        gns.gram_newton_schulz(xb, SCHEDULE, EPS, out=xb)


def test_mirror_upper_is_exact():
    c = randn((2, 37, 37), 8).to(torch.bfloat16).to(DEVICE)
    want = ref.upper_mirrored(c)
    for launch in gns.prepare_mirror_upper(c, block=16):
        launch()
    assert_bitwise_equal(c, want, what="mirrored upper triangle")
    assert torch.equal(c, c.mT)

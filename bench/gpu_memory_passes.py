"""The memory-bound passes on the GPU: parity with the eager reference and achieved bandwidth.

    python bench/gpu_memory_passes.py                   # GPU: -> bench/results/gpu_memory_passes_<gpu>.json
    python bench/gpu_memory_passes.py --interpret-smoke # CPU, TRITON_INTERPRET=1: parity part, tiny shapes

(What the kernels compile to for sm_90 without a GPU: ``bench/compile_report.py``.)

For each bucket shape (4096x4096, the stack 12x768x3072 and its transpose) it records

* parity of every kernel with its eager twin from ``trasmuon.reference`` on the same inputs
  (bit equality where the kernels are exact on the CPU, and the tolerance-table check against a
  float64 evaluation): momentum + energy pass, column energy of O_base, row sums of squares,
  row statistics, the gate (exact k-th smallest), the update pass for bf16 and fp32 params;
* the median time (``triton.testing.do_bench`` after warm-up, via bench/timing.py) of each pass
  and its achieved bandwidth = (bytes read + written, the pass's floor: see
  docs/kernels-memory.md) / time, next to a device-to-device copy measured in the same run,
  and the fraction of it (the issue's target: >= 0.7 for the memory passes).

The kernels run with their default (heuristic) launch configs; pointer-table (list) buckets
are timed too. Results go to JSON with the GPU name and the torch and triton versions, written
after every row. ``--budget-s``: before every shape (parity) and every pass (timing) the
seconds since the script started are checked; once they pass the budget, what is left gets
rows with ``"error": "skipped: ..."`` (exit status 1), so that a run under a time limit ends
with its JSON complete instead of being cut off.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

_STARTED = time.perf_counter()  # --budget-s counts from here (imports included)
ROOT = Path(__file__).resolve().parents[1]
SHAPES: list[tuple[int, int, int]] = [(1, 4096, 4096), (12, 768, 3072), (12, 3072, 768)]
SMOKE_SHAPES: list[tuple[int, int, int]] = [(1, 9, 17), (3, 17, 9), (2, 33, 1), (2, 1, 40)]
TARGET_FRACTION = 0.7  # of the copy bandwidth, for the memory passes
# Bytes a kernel must read + write per matrix element, bf16 G, O and W, fp32 M
# (docs/kernels-memory.md): the floors of the passes here and of bench/gpu_profile_step.py's
# kernel rows. Per-row and per-column vectors (under 1% at these shapes) are left out.
KERNEL_BYTES = {
    "_momentum_energy_kernel": 2 + 4 + 4 + 2,  # G read, M read + written, X written
    "_column_energy_kernel": 2,  # O read
    "_row_sumsq_kernel": 2,  # O read
    "_update_kernel": 2 + 2 + 2,  # O read, W read + written (fp32 W: 2 + 4 + 4)
}
BETA1, BETA2, EPS, SCALE, WD = 0.95, 0.95, 1e-8, 0.2, 0.1
GATE_KWARGS = dict(
    warmup_steps=0, clip_period=1, clip_alpha=1.0, clip_min=0.7, clip_trigger=3.0,
    clip_beta=0.9, energy_beta=0.99, energy_quantile=0.5, energy_eps=1e-12,
    schedule_free=True, sf_mix=0.3,
)


def _kernel_gate_kwargs(d_in: int) -> dict:
    """GATE_KWARGS for the gate kernel: the rank and the schedule-free eps resolved from the
    rule, as the fused step does."""
    from trasmuon import reference as ref

    kw = {k: v for k, v in GATE_KWARGS.items() if k != "energy_quantile"}
    return dict(kw, k=ref.quantile_rank(d_in, GATE_KWARGS["energy_quantile"]), sf_eps=ref.SCHEDULE_FREE_EPS)


def _timing():
    sys.path.insert(0, str(ROOT / "bench"))
    import timing  # bench/timing.py, by path (only torch and triton)

    return timing


def _check(name, got, want64, *, twin=None, exact_expected=False, dtype=None) -> dict:
    """One parity row: tolerance-table check against float64, and bit equality with the
    eager twin (``exact_expected``: the CPU interpreter run is bit-identical for this one)."""
    import torch

    from trasmuon_kernels.testing import TOLERANCES, relative_fro_error

    got_d = got.detach().double().cpu()
    want = want64.detach().double().cpu()
    tol = TOLERANCES[dtype or got.dtype]
    scale = want.abs().max().item() if want.numel() else 0.0
    bound = tol.rtol * want.abs() + tol.atol * scale
    within = bool((~torch.isnan(got_d)).all() and ((got_d - want).abs() <= bound).all())
    row = {
        "check": name,
        "within_tolerance": within,
        "max_abs_err": float((got_d - want).abs().max().item()) if want.numel() else 0.0,
        "rel_fro_err": relative_fro_error(got, want) if want.numel() and want.norm() > 0 else 0.0,
    }
    if twin is not None:
        row["bit_equal_to_twin"] = bool(torch.equal(got.cpu(), twin.cpu()))
        row["bit_equality_expected_on_cpu"] = exact_expected
    return row


def parity(shape: tuple[int, int, int], device) -> list[dict]:
    """Every kernel against its eager twin on one bucket shape."""
    import torch

    from trasmuon import reference as ref
    from trasmuon_kernels.gate import gate_stage_, kth_smallest
    from trasmuon_kernels.momentum_energy import column_energy, momentum_energy_pass_
    from trasmuon_kernels.update import EtaRows, row_stats_, row_sumsq, update_pass_

    count, d_out, d_in = shape
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*s, dtype=torch.float32):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    rows = []
    grad = randn(count, d_out, d_in, dtype=torch.bfloat16)
    grad[..., : max(1, d_in // 64)] *= 100  # bursty columns
    momentum = randn(count, d_out, d_in) * 0.1
    m_twin, m64 = momentum.clone(), momentum.double()
    res = momentum_energy_pass_(grad, momentum, BETA1, energy_source="momentum")
    x_twin, e_twin, _ = ref.momentum_energy_pass_(m_twin, grad, BETA1, nesterov=False, energy_source="momentum")
    _, e64, _ = ref.momentum_energy_pass_(m64, grad.double(), BETA1, nesterov=False,
                                          energy_source="momentum", ns_dtype=torch.float64)
    rows.append(_check("momentum", momentum, m64, twin=m_twin, exact_expected=True))
    rows.append(_check("ns_input_x", res.x, m64, twin=x_twin, exact_expected=True))  # X = bf16(M)
    rows.append(_check("column_energy", res.energy, e64, twin=e_twin))
    rows.append(_check("x_sqnorm", res.x_sqnorm, (x_twin.double() ** 2).sum(dim=(-2, -1))))

    ortho = ref.newton_schulz(res.x, ref.ns_schedule(ref.TRASMUON_NS_COEFFICIENTS, 5), EPS)
    rss = row_sumsq(ortho)
    rows.append(_check("row_sumsq", rss, ref.row_sumsq(ortho.double(), torch.float64), twin=ref.row_sumsq(ortho)))
    v0 = (torch.rand(count, d_out, generator=gen) * 1e-3).to(device)
    v_k, v_r, v64 = v0.clone(), v0.clone(), v0.double()
    lr = 0.02
    rowscale, eta = row_stats_(v_k, rss, d_in=d_in, beta2=BETA2, eps=EPS, scale=SCALE, lr=lr,
                               eta_eps=ref.ETA_HAT_EPS)
    rs_twin, eta_twin = ref.row_stats_(v_r, rss, d_in, beta2=BETA2, eps=EPS, scale=SCALE, lr=lr)
    rs64, eta64 = ref.row_stats_(v64, rss.double(), d_in, beta2=BETA2, eps=EPS, scale=SCALE, lr=lr)
    rows.append(_check("row_v", v_k, v64, twin=v_r, exact_expected=True))
    rows.append(_check("rowscale", rowscale, rs64, twin=rs_twin))
    rows.append(_check("eta_hat", eta, eta64, twin=eta_twin))
    upd_e = column_energy(ortho, row_scale=rowscale)
    rows.append(_check("update_energy", upd_e, ref.update_energy(ortho.double(), rowscale.double(), torch.float64)))

    k = ref.quantile_rank(d_in, 0.5)
    kth = kth_smallest(res.energy, k)
    rows.append({"check": "kth_smallest", "bit_equal_to_twin": bool(torch.equal(kth, ref.kth_smallest(res.energy, k))),
                 "bit_equality_expected_on_cpu": True, "within_tolerance": bool(torch.equal(kth, ref.kth_smallest(res.energy, k)))})
    sk, sr = {}, {}
    for s in (sk, sr):
        ref.init_gate_state(s, (count,), d_in, True, torch.device(device))
    for t in (1, 2):
        gate = gate_stage_(sk, res.energy, t, lr, **_kernel_gate_kwargs(d_in))
        gate_twin = ref.gate_stage_(sr, res.energy, t, lr, **GATE_KWARGS)
    rows.append(_check("gate", gate, gate_twin.double(), twin=gate_twin, exact_expected=True))

    for dtype in (torch.bfloat16, torch.float32):
        w = randn(count, d_out, d_in, dtype=dtype)
        w_twin, w64 = w.clone(), w.double()
        update_pass_(w, ortho, lr=lr, weight_decay=WD, row=EtaRows(eta, rowscale), col_gate=gate)
        ref.weight_update_pass_(w_twin, ortho, lr, WD, eta_hat=eta, rowscale=rowscale, col_gate=gate)
        ref.weight_update_pass_(w64, ortho.double(), lr, WD, eta_hat=eta.double(),
                                rowscale=rowscale.double(), col_gate=gate.double())
        rows.append(_check(f"update_{str(dtype).replace('torch.', '')}", w, w64, twin=w_twin, exact_expected=True))
        lst = [p.clone() for p in w_twin]
        update_pass_(lst, ortho, lr=lr, weight_decay=WD, row=EtaRows(eta, rowscale), col_gate=gate)
        ref.weight_update_pass_(w_twin, ortho, lr, WD, eta_hat=eta, rowscale=rowscale, col_gate=gate)
        rows.append({"check": f"update_{str(dtype).replace('torch.', '')}_pointer_table",
                     "bit_equal_to_twin": bool(torch.equal(torch.stack(lst), w_twin)),
                     "bit_equality_expected_on_cpu": True,
                     "within_tolerance": bool(torch.equal(torch.stack(lst), w_twin))})
    for row in rows:
        row["shape"] = list(shape)
    return rows


def _budget_spent(budget_s: float | None) -> str | None:
    """The skip message once the script has run past ``budget_s`` seconds, else None."""
    if budget_s is not None and time.perf_counter() - _STARTED > budget_s:
        return f"skipped: the {budget_s:.0f} s budget is spent"
    return None


def bandwidth(shape: tuple[int, int, int], device, timing, emit, budget_s: float | None = None) -> None:
    """Median time and achieved GB/s of every pass, each row handed to ``emit`` as soon as it
    is measured (in-place passes run repeatedly: values drift, bytes do not)."""
    import torch

    from trasmuon import reference as ref
    from trasmuon_kernels._common import TensorBucket
    from trasmuon_kernels.gate import gate_stage_
    from trasmuon_kernels.momentum_energy import column_energy, momentum_energy_pass_
    from trasmuon_kernels.update import EtaRows, row_stats_, row_sumsq, update_pass_

    count, d_out, d_in = shape
    n = count * d_out * d_in
    grad = torch.randn(count, d_out, d_in, device=device).to(torch.bfloat16)
    momentum = torch.randn(count, d_out, d_in, device=device) * 0.1
    x = torch.empty(count, d_out, d_in, device=device, dtype=torch.bfloat16)
    energy = torch.empty(count, d_in, device=device)
    sq = torch.empty(count, device=device)
    grads = TensorBucket.of([g.clone() for g in grad], "grad")
    moms = TensorBucket.of([m.clone() for m in momentum], "momentum")
    ortho = torch.randn(count, d_out, d_in, device=device).to(torch.bfloat16) / (d_in**0.5)
    rss = row_sumsq(ortho)
    v = torch.rand(count, d_out, device=device)
    rowscale, eta = row_stats_(v.clone(), rss, d_in=d_in, beta2=BETA2, eps=EPS, scale=SCALE, lr=1e-3,
                               eta_eps=ref.ETA_HAT_EPS)
    gate = torch.rand(count, d_in, device=device) * 0.3 + 0.7
    w16 = torch.randn(count, d_out, d_in, device=device).to(torch.bfloat16)
    w32 = torch.randn(count, d_out, d_in, device=device)
    w16_list = TensorBucket.of([p.clone() for p in w16], "param")
    state: dict = {}
    ref.init_gate_state(state, (count,), d_in, True, torch.device(device))
    lr_t = torch.tensor(1e-3, device=device)
    step_t = torch.tensor(5.0, device=device)

    cases = [
        # (name, fn, bytes read + written per element, or None for the tiny kernels)
        ("momentum_energy_bf16_grad", lambda: momentum_energy_pass_(
            grad, momentum, BETA1, x_out=x, energy_out=energy, sqnorm_out=sq),
         KERNEL_BYTES["_momentum_energy_kernel"]),
        ("momentum_energy_bf16_grad_pointer_tables", lambda: momentum_energy_pass_(
            grads, moms, BETA1, x_out=x, energy_out=energy, sqnorm_out=sq),
         KERNEL_BYTES["_momentum_energy_kernel"]),
        ("column_energy_update_source", lambda: column_energy(ortho, row_scale=rowscale, out=energy),
         KERNEL_BYTES["_column_energy_kernel"]),
        ("row_sumsq", lambda: row_sumsq(ortho, out=rss), KERNEL_BYTES["_row_sumsq_kernel"]),
        ("update_bf16_param", lambda: update_pass_(
            w16, ortho, lr=lr_t, weight_decay=WD, row=EtaRows(eta, rowscale), col_gate=gate),
         KERNEL_BYTES["_update_kernel"]),
        ("update_bf16_param_pointer_table", lambda: update_pass_(
            w16_list, ortho, lr=lr_t, weight_decay=WD, row=EtaRows(eta, rowscale), col_gate=gate),
         KERNEL_BYTES["_update_kernel"]),
        ("update_fp32_param", lambda: update_pass_(
            w32, ortho, lr=lr_t, weight_decay=WD, row=EtaRows(eta, rowscale), col_gate=gate), 4 + 4 + 2),
        ("row_stats", lambda: row_stats_(v, rss, d_in=d_in, beta2=BETA2, eps=EPS, scale=SCALE, lr=lr_t,
                                         eta_eps=ref.ETA_HAT_EPS), None),
        ("gate", lambda: gate_stage_(state, energy.abs(), step_t, lr_t, **_kernel_gate_kwargs(d_in),
                                     first=False), None),
    ]
    for name, fn, bytes_per_elem in cases:
        row = {"pass": name, "shape": list(shape)}
        skipped = _budget_spent(budget_s)
        if skipped:
            row["error"] = skipped
        else:
            ms = timing.median_ms(fn, device)
            row["median_ms"] = ms
            if bytes_per_elem is not None:
                row["bytes"] = n * bytes_per_elem
                row["gbs"] = n * bytes_per_elem / (ms * 1e-3) / 1e9
        emit(row)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interpret-smoke", action="store_true",
                    help="CPU + TRITON_INTERPRET=1: the parity part on tiny shapes, no timing")
    ap.add_argument("--parity-only", action="store_true", help="the parity checks, no timings")
    ap.add_argument("--shapes", default=None, help="e.g. '1x4096x4096,12x768x3072'")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip the shapes and passes left once the script has run this many seconds")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton or the kernels are imported
    sys.path.insert(0, str(ROOT))
    import torch
    import triton

    timing = _timing()
    device = torch.device("cpu" if args.interpret_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no GPU here: run with --interpret-smoke for the CPU parity check")
    shapes = SMOKE_SHAPES if args.interpret_smoke else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    result: dict = {"env": timing.environment(device), "interpret_smoke": bool(args.interpret_smoke),
                    "torch": torch.__version__, "triton": triton.__version__,
                    "target_fraction_of_copy": TARGET_FRACTION}
    out = args.out
    if out is None and device.type == "cuda" and not args.parity_only:
        slug = timing.device_name(device).replace(" ", "_").replace("/", "_")
        out = ROOT / "bench" / "results" / f"gpu_memory_passes_{slug}.json"
    result["parity"] = []
    for shape in shapes:  # (a skipped shape: one row with its error, no within_tolerance)
        skipped = _budget_spent(args.budget_s)
        result["parity"] += ([{"check": "all", "shape": list(shape), "error": skipped}] if skipped
                             else parity(shape, device))
        timing.write_json(out, result)  # as it goes: a run cut off keeps what it checked
    checked = [r for r in result["parity"] if "error" not in r]
    failed = [r for r in checked if not r["within_tolerance"]]
    # On the CPU the interpreter run must also be bit-identical where the tests say so.
    if device.type == "cpu":
        failed += [r for r in checked if r.get("bit_equality_expected_on_cpu") and not r["bit_equal_to_twin"]]
    for r in result["parity"]:
        flag = "-- " if "error" in r else "ok " if r not in failed else "BAD"
        print(f"{flag} {r['check']:34s} {r['shape']} "
              + (r["error"] if "error" in r else f"bit_equal={r.get('bit_equal_to_twin')} "
                 f"rel_fro={r.get('rel_fro_err', 0.0):.2e}"))
    if device.type == "cuda" and not args.parity_only:
        copy_gbs = timing.copy_bandwidth_gbs(device)
        result["copy_gbs"] = copy_gbs
        result["passes"] = []

        def emit(row: dict) -> None:
            if "gbs" in row:
                row["fraction_of_copy"] = row["gbs"] / copy_gbs
                row["meets_target"] = row["fraction_of_copy"] >= TARGET_FRACTION
            result["passes"].append(row)
            timing.write_json(out, result)  # after every row: a run cut off keeps the rest
            print(f"{row['pass']:42s} {row['shape']} "
                  + (row["error"] if "error" in row else f"{row['median_ms']:.4f} ms ")
                  + (f"{row['gbs']:.0f} GB/s ({row['fraction_of_copy']:.0%} of copy)" if "gbs" in row else ""),
                  flush=True)

        for shape in shapes:
            bandwidth(shape, device, timing, emit, args.budget_s)
        print(f"device-to-device copy: {copy_gbs:.0f} GB/s")
    timing.write_json(out, result)
    if out is not None:
        print(f"wrote {out}")
    skipped_rows = [r for r in result["parity"] + result.get("passes", []) if "error" in r]
    print(f"parity: {len(checked) - len(failed)}/{len(checked)} checks passed"
          + (f"; {len(skipped_rows)} rows skipped (budget)" if skipped_rows else ""))
    return 1 if failed or skipped_rows else 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-stage benchmarks (the fused step's data flow, docs/backends.md): the eager reference of each stage and,
on a GPU, its Triton kernel, on a bucket of same-shape matrices. Memory passes report GB/s
(bytes that must move: each input read once, each output written once), Newton-Schulz
TFLOP/s (dense FLOP count of the 5-step chain, 2mnk per product)."""

import pytest
import torch

from trasmuon import reference as ref

from .timing import environment, median_ms

# (name, batch, d_out, d_in)
CASES_FULL = [("4096x4096", 1, 4096, 4096), ("gpt2 12x768x3072", 12, 768, 3072),
              ("qwen3 28x1024x3072", 28, 1024, 3072)]
CASES_CI = [("1x64x96", 1, 64, 96), ("3x48x80", 3, 48, 80)]
STAGES = ["momentum_energy", "newton_schulz", "gate", "update"]
GATE_KW = dict(warmup_steps=0, clip_period=1, clip_alpha=1.0, clip_min=0.7, clip_trigger=3.0,
               clip_beta=0.9, energy_beta=0.99, energy_quantile=0.5, energy_eps=1e-12,
               schedule_free=True, sf_mix=0.3)


def _ns_flops(d_out: int, d_in: int, steps: int = 5) -> float:
    d, k = min(d_out, d_in), max(d_out, d_in)
    return steps * (2 * d * d * k + 2 * d**3 + 2 * d * d * k)


def _stage(stage, impl, batch, d_out, d_in, device):
    """(function to time, bytes moved, flops) for one stage on fresh random inputs."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device)
    bf16 = torch.bfloat16
    if impl == "triton":
        from trasmuon_kernels import gate, momentum_energy, newton_schulz, update
    n = batch * d_out * d_in
    if stage == "momentum_energy":
        g, m = rnd(batch, d_out, d_in).to(bf16), rnd(batch, d_out, d_in)
        fn = (lambda: momentum_energy.momentum_energy_pass_(g, m, 0.95)) if impl == "triton" else (
            lambda: ref.momentum_energy_pass_(m, g, 0.95, nesterov=False, energy_source="momentum"))
        return fn, n * (2 + 4 + 4 + 2), 0.0
    if stage == "newton_schulz":
        x = rnd(batch, d_out, d_in).to(bf16)
        sched = ref.ns_schedule(ref.TRASMUON_NS_COEFFICIENTS, 5)
        fn = (lambda: newton_schulz.newton_schulz(x, sched, 1e-8)) if impl == "triton" else (
            lambda: ref.newton_schulz(x, sched, 1e-8))
        return fn, 0, batch * _ns_flops(d_out, d_in)
    if stage == "gate":
        energy = rnd(batch, d_in).abs()
        state: dict = {}
        ref.init_gate_state(state, (batch,), d_in, True, torch.device(device))
        state["energy_ref"] = energy.median(dim=-1).values
        kernel_kw = {k: v for k, v in GATE_KW.items() if k != "energy_quantile"}
        kernel_kw.update(k=ref.quantile_rank(d_in, GATE_KW["energy_quantile"]), sf_eps=ref.SCHEDULE_FREE_EPS)
        fn = (lambda: gate.gate_stage_(state, energy, 4, 1e-3, **kernel_kw)) if impl == "triton" else (
            lambda: ref.gate_stage_(state, energy, 4, 1e-3, **GATE_KW))
        return fn, batch * d_in * 4 * 7, 0.0
    w, o = rnd(batch, d_out, d_in).to(bf16), rnd(batch, d_out, d_in).to(bf16)
    eta, rs, c = rnd(batch).abs(), rnd(batch, d_out).abs(), rnd(batch, d_in).abs().clamp(0.7, 1)
    fn = (lambda: update.update_pass_(w, o, lr=1e-3, weight_decay=0.1, row=update.EtaRows(eta, rs),
                                      col_gate=c)) if impl == "triton" else (
        lambda: ref.weight_update_pass_(w, o, 1e-3, 0.1, eta_hat=eta, rowscale=rs, col_gate=c))
    return fn, n * (2 + 2 + 2), 0.0


@pytest.mark.parametrize("stage", STAGES)
def test_stage(benchmark, bench_device, quick, stage, stage_backend, stage_case):
    # stage_backend: "eager", plus "triton" on a GPU (interpreted timings mean nothing);
    # stage_case: CASES_FULL or CASES_CI by --bench-size (see conftest.py).
    backend = stage_backend
    case, batch, d_out, d_in = stage_case
    fn, nbytes, flops = _stage(stage, backend, batch, d_out, d_in, bench_device)
    ms = median_ms(fn, bench_device, quick=quick)
    info = {"suite": f"stage:{stage}", "case": case, "impl": backend, "median_ms": ms}
    if nbytes:
        info["gbs"] = nbytes / (ms * 1e-3) / 1e9
    if flops:
        info["tflops"] = flops / (ms * 1e-3) / 1e12
    benchmark.extra_info.update(environment(bench_device), **info)
    sync = torch.cuda.synchronize if bench_device.type == "cuda" else (lambda: None)
    benchmark.pedantic(lambda: (fn(), sync()), rounds=1 if quick else 10, warmup_rounds=0 if quick else 2)


@pytest.mark.parametrize("ns_impl", ["ours", "torch-muon"])
def test_newton_schulz_square_sweep(benchmark, bench_device, quick, square, stage_backend, ns_impl):
    """5 NS steps on one square matrix: ours (eager reference or Triton) against
    torch.optim.Muon's chain on the same bf16 input."""
    if ns_impl == "torch-muon" and stage_backend != "eager":
        pytest.skip("torch.optim.Muon's chain is one implementation; timed once per size")
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(square, square, generator=gen).to(bench_device, torch.bfloat16)
    if ns_impl == "torch-muon":
        from torch.optim._muon import _zeropower_via_newtonschulz

        fn = lambda: _zeropower_via_newtonschulz(x, ref.MUON_NS_COEFFICIENTS, 5, 1e-7)
        name = "torch-muon"
    elif stage_backend == "triton":
        from trasmuon_kernels.newton_schulz import newton_schulz

        fn = lambda: newton_schulz(x, ref.ns_schedule(ref.TRASMUON_NS_COEFFICIENTS, 5), 1e-8)
        name = "triton"
    else:
        sched = ref.ns_schedule(ref.TRASMUON_NS_COEFFICIENTS, 5)
        fn = lambda: ref.newton_schulz(x, sched, 1e-8)
        name = "eager"
    ms = median_ms(fn, bench_device, quick=quick)
    benchmark.extra_info.update(environment(bench_device), suite="ns-square", case=f"{square}^2",
                                impl=name, median_ms=ms,
                                tflops=_ns_flops(square, square) / (ms * 1e-3) / 1e12)
    sync = torch.cuda.synchronize if bench_device.type == "cuda" else (lambda: None)
    benchmark.pedantic(lambda: (fn(), sync()), rounds=1 if quick else 10, warmup_rounds=0 if quick else 2)

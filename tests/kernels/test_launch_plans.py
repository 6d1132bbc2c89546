"""Prepared launches, configs as pure functions of device props, and the package boundary.

* ``trasmuon_kernels`` is a leaf package: its modules import without ``trasmuon``.
* Every heuristic config is a function of shapes, dtypes and a ``DeviceProps``: asked with
  ``H200`` it returns the GPU's picks, here on a CPU, also for CPU tensors.
* ``prepare_*`` lists replayed twice give bitwise what the public functions give, allocate
  nothing on replay (no torch allocation function is called, every tensor argument keeps
  its address) and record the same launches each time.
"""

from __future__ import annotations

import contextlib
import json
import pkgutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import trasmuon_kernels
from trasmuon import reference as ref
from trasmuon_kernels import fro_sumsq as fro_mod
from trasmuon_kernels import gate as gate_mod
from trasmuon_kernels import gram as gram_mod
from trasmuon_kernels import momentum_energy as me_mod
from trasmuon_kernels import newton_schulz as ns_mod
from trasmuon_kernels import ns_apply as apply_mod
from trasmuon_kernels import update as up_mod
from trasmuon_kernels._common import (
    GPU_TILE,
    INTERPRETER_REDUCE_BLOCK_R,
    PassConfig,
    default_config,
    sm_count,
    vector_block_config,
)
from trasmuon_kernels._launch import (
    H200,
    INTERPRETER,
    Launch,
    TorchLaunch,
    record_launches,
    run_all,
)
from trasmuon_kernels.gram import GramConfig
from trasmuon_kernels.ns_apply import ApplyConfig

from .with_rule import gate_args

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-8
SCHEDULE = ref.ns_schedule(ref.TRASMUON_NS_COEFFICIENTS, 3)


# --------------------------------------------------------------------------------------
# A leaf package
# --------------------------------------------------------------------------------------
KERNEL_MODULES = sorted(m.name for m in pkgutil.iter_modules(trasmuon_kernels.__path__))

# In a fresh interpreter: import torch and triton once, then import each kernel module in a
# forked child (cheap) and report which trasmuon modules it pulled in.
_LEAK_PROBE = """
import importlib, json, os, sys
import torch, triton
report = {}
for name in sys.argv[1:]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            importlib.import_module("trasmuon_kernels." + name)
            leaked = sorted(m for m in sys.modules if m == "trasmuon" or m.startswith("trasmuon."))
        except Exception as exc:
            leaked = ["import failed: %r" % exc]
        os.write(write_end, json.dumps(leaked).encode())
        os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 65536):
        data += chunk
    os.waitpid(pid, 0)
    report[name] = json.loads(data or b'["no report"]')
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def trasmuon_imports_by_module() -> dict[str, list[str]]:
    env = {"TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", _LEAK_PROBE, *KERNEL_MODULES], env=env,
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernel_modules_do_not_import_trasmuon(module, trasmuon_imports_by_module):
    assert trasmuon_imports_by_module[module] == [], (
        f"trasmuon_kernels.{module} imports {trasmuon_imports_by_module[module]}: the kernels "
        "take what the rule defines as arguments"
    )


def test_energy_sources_match_the_rule():
    assert me_mod.ENERGY_SOURCES == ref.ENERGY_SOURCES
    assert me_mod.PASS1_ENERGY_SOURCES == (*(s for s in ref.ENERGY_SOURCES if s != "update"), None)


# --------------------------------------------------------------------------------------
# Configs as pure functions of props
# --------------------------------------------------------------------------------------
def test_newton_schulz_configs_for_an_h200():
    # Big products: 128x128 tiles, 8 warps, 3 stages once the triangle fills 132 SMs.
    # Capped at 128 registers per thread: two blocks of 8 warps per SM.
    big = ns_mod.default_config(1, 4096, 4096, H200)
    assert big.gram == GramConfig(block=128, block_k=64, num_warps=8, num_stages=3, maxnreg=128)
    assert big.poly == GramConfig(block=128, block_k=64, num_warps=8, num_stages=3, maxnreg=128)
    assert big.apply == ApplyConfig(128, 128, 64, 8, 8, 3, maxnreg=128)
    # 1024^2 alone: 36 tiles of 128 would leave SMs idle, so 64x64 (136 programs).
    small = ns_mod.default_config(1, 1024, 1024, H200)
    assert small.gram == GramConfig(block=64, block_k=64, num_warps=4, num_stages=4)
    assert small.apply == ApplyConfig(64, 64, 64, 8, 4, 4)  # 64x128 would give 128 < 132 tiles
    # A stack of 12 GPT-2 MLP matrices (tall): d = 768, 12 * 21 triangle tiles of 128.
    stack = ns_mod.default_config(12, 3072, 768, H200)
    assert stack.gram.block == stack.poly.block == 128 and stack.apply.block_m == 128
    # The SM count is the device's, not a constant.
    fewer = ns_mod.default_config(1, 1024, 1024, type(H200)(kind="cuda", sm_count=16))
    assert fewer.gram.block == 128
    # The interpreter's configs: larger programs, one stage.
    interp = ns_mod.default_config(1, 4096, 4096, INTERPRETER)
    assert interp.gram == GramConfig(block=64, block_k=64, num_warps=4, num_stages=1)
    assert interp.apply == ApplyConfig(64, 64, 64, 4, 4, 1)


def test_memory_pass_configs_for_an_h200():
    assert default_config(4096, 4096, props=H200) == PassConfig(block_r=16, block_c=256, num_warps=8)
    assert default_config(4096, 4096, props=H200, reduces_columns=True).block_r == 16
    assert default_config(768, 3072, props=H200).block_r * 256 == GPU_TILE
    interp = default_config(4096, 4096, props=INTERPRETER, reduces_columns=True)
    assert interp.block_r == INTERPRETER_REDUCE_BLOCK_R and interp.block_c == 256
    assert default_config(4096, 4096, props=INTERPRETER).block_r == 256
    # Row splits: about 4 programs per SM over the bucket.
    cfg = default_config(4096, 4096, props=H200, reduces_columns=True)
    n_splits, rows = me_mod._splits(cfg, 1, 4096, 16, H200)
    assert (n_splits, rows) == (32, 128) and n_splits * 16 >= 4 * 132 - 16
    assert me_mod._splits(cfg, 1, 4096, 16, INTERPRETER) == (1, 4096)
    assert sm_count(H200) == 132 and sm_count(INTERPRETER) == 1
    assert fro_mod.fro_sumsq_config(4096, 4096, H200) == (8, 512)
    assert fro_mod.fro_sumsq_config(4096, 4096, INTERPRETER) == (16, 64)
    assert vector_block_config(4096, H200) == (4096, 16)
    assert vector_block_config(768, H200) == (1024, 4)
    assert vector_block_config(65536, H200) == (4096, 16)


def test_h200_launches_for_cpu_tensors():
    # Explicit props: the launches an H200 would get, planned while holding CPU tensors (the
    # sm_90 compile report compiles exactly these).
    x = torch.empty(1, 4096, 4096, dtype=torch.bfloat16)
    prepared = ns_mod.prepare_newton_schulz(x, SCHEDULE, EPS, fro_sumsq=torch.empty(1),
                                            props=H200)
    products = [launch for launch in prepared if isinstance(launch, Launch)]
    assert len(products) == 3 * len(SCHEDULE)
    for launch in products:
        meta = launch.meta
        assert (meta.get("BLOCK", meta.get("BLOCK_M")), meta["num_warps"], meta["num_stages"],
                meta["maxnreg"]) == (128, 8, 3, 128)
    me = me_mod.prepare_momentum_energy_pass(torch.empty(1, 4096, 4096), torch.empty(1, 4096, 4096),
                                             0.95, props=H200)
    assert me[0].meta["BLOCK_R"] == 16 and me[0].grid == (32 * 16,)


# --------------------------------------------------------------------------------------
# Replays
# --------------------------------------------------------------------------------------
_ALLOCATORS = ("empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones",
               "ones_like", "full", "full_like", "tensor", "stack", "cat")


@contextlib.contextmanager
def no_torch_allocation(monkeypatch) -> Iterator[None]:
    """Fail if the block allocates: on CUDA, the caching allocator's count of allocations
    must not move; on the CPU, no torch allocation function may be called."""
    if DEVICE == "cuda":
        def count():
            return torch.cuda.memory_stats().get("allocation.all.allocated", 0)

        before = count()
        yield
        torch.cuda.synchronize()
        assert count() == before, f"{count() - before} CUDA allocations during a replay"
        return
    with monkeypatch.context() as patch:
        for name in _ALLOCATORS:
            def refuse(*args, _name=name, **kwargs):
                raise AssertionError(f"torch.{_name} called during a replay")
            patch.setattr(torch, name, refuse)
        yield


def _tensor_addresses(prepared) -> list[int]:
    out = []
    for launch in prepared:
        args = launch.args if isinstance(launch, Launch) else launch.tensors
        out += [a.data_ptr() for a in args if isinstance(a, torch.Tensor)]
    return out


def _replay_twice(monkeypatch, prepared, read: Callable[[], list[torch.Tensor]]):
    """Two replays of ``prepared``: (what ``read`` returns after each, their launch records)."""
    addresses = _tensor_addresses(prepared)
    results, records = [], []
    for _ in range(2):
        with record_launches() as rec, no_torch_allocation(monkeypatch):
            run_all(prepared)
        results.append([t.clone() for t in read()])
        records.append(rec)
        assert _tensor_addresses(prepared) == addresses
    assert records[0] == records[1], "two replays issued different launches"
    assert len(records[0]) == len(prepared)
    return results


def _assert_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def _bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16)


def _rand(*shape, gen):
    return torch.rand(*shape, generator=gen).to(DEVICE)


@pytest.mark.parametrize("shape", [(2, 17, 33), (3, 29, 12)], ids=["wide", "tall"])
def test_newton_schulz_replays(monkeypatch, shape):
    x = _bf16(*shape, seed=1)
    want_rsq = torch.empty(shape[:-1], device=DEVICE)
    want = ns_mod.newton_schulz(x, SCHEDULE, EPS, row_sumsq_out=want_rsq)
    rsq = torch.full(shape[:-1], float("nan"), device=DEVICE)
    prepared = ns_mod.prepare_newton_schulz(x, SCHEDULE, EPS, row_sumsq_out=rsq)
    assert prepared.result.shape == x.shape
    for got in _replay_twice(monkeypatch, prepared, lambda: [prepared.result, rsq]):
        _assert_equal(got, [want, want_rsq])


def test_newton_schulz_overwrite_input_needs_no_spare(monkeypatch):
    # 3 steps: x -> out -> x -> out. Only the input, out, the two Gram buffers and the
    # small reduction buffers appear in the launches.
    x = _bf16(2, 17, 33, seed=2)
    want = ns_mod.newton_schulz(x, SCHEDULE, EPS)
    x_work = x.clone()
    out = torch.empty_like(x)
    prepared = ns_mod.prepare_newton_schulz(x_work, SCHEDULE, EPS, out=out, overwrite_input=True)
    big = {t.data_ptr() for launch in prepared if isinstance(launch, Launch)
           for t in launch.args if isinstance(t, torch.Tensor) and t.numel() >= x.numel()}
    assert big == {x_work.data_ptr(), out.data_ptr()}
    with record_launches(), no_torch_allocation(monkeypatch):
        run_all(prepared)
    assert torch.equal(out, want)
    assert not torch.equal(x_work, x), "the input was not used as the spare"
    ws = ns_mod.newton_schulz_workspace(x.shape, DEVICE, steps=3, overwrite_input=True)
    assert ws.x is None
    # An even number of steps needs a spare: overwrite_input then uses the workspace.
    even = ns_mod.prepare_newton_schulz(x.clone(), SCHEDULE[:2], EPS, overwrite_input=True)
    assert torch.equal(ns_mod.newton_schulz(x, SCHEDULE[:2], EPS), (run_all(even), even.result)[1])
    with pytest.raises(ValueError, match="bf16 input"):
        ns_mod.prepare_newton_schulz(x.float(), SCHEDULE, EPS, overwrite_input=True)


def test_product_kernel_replays(monkeypatch):
    z = _bf16(2, 21, 40, seed=3)
    fro = torch.tensor([3.0, 5.0], device=DEVICE)
    a_want = gram_mod.sym_gram(z, torch.empty(2, 21, 21, dtype=torch.bfloat16, device=DEVICE),
                               fro_sumsq=fro, eps=1e-3)
    a = torch.empty(2, 21, 21, dtype=torch.bfloat16, device=DEVICE)
    prepared = gram_mod.prepare_sym_gram(z, a, fro_sumsq=fro, eps=1e-3)
    for got in _replay_twice(monkeypatch, prepared, lambda: [a]):
        _assert_equal(got, [a_want])

    small = ApplyConfig(16, 16, 16, 2, 4, 1)  # two column tiles: partials + torch.sum
    rsq_want = torch.empty(2, 21, device=DEVICE)
    c_want = apply_mod.ns_apply(a, z, z, torch.empty_like(z), alpha=2.0, row_sumsq_out=rsq_want,
                                config=small)
    c, rsq = torch.empty_like(z), torch.empty(2, 21, device=DEVICE)
    prepared = apply_mod.prepare_ns_apply(a, z, z, c, alpha=2.0, row_sumsq_out=rsq, config=small)
    assert any(isinstance(launch, TorchLaunch) for launch in prepared)
    for got in _replay_twice(monkeypatch, prepared, lambda: [c, rsq]):
        _assert_equal(got, [c_want, rsq_want])

    want = fro_mod.fro_sumsq(z)
    prepared = fro_mod.prepare_fro_sumsq(z)
    for got in _replay_twice(monkeypatch, prepared, lambda: [prepared.result]):
        _assert_equal(got, [want])


def test_memory_pass_replays(monkeypatch):
    count, d_out, d_in = 3, 37, 20
    gen = torch.Generator().manual_seed(4)
    grad = torch.randn(count, d_out, d_in, generator=gen).to(DEVICE, torch.bfloat16)
    m0 = torch.randn(count, d_out, d_in, generator=gen).to(DEVICE)
    cfg = PassConfig(block_r=8, block_c=8, splits=2)  # several splits and column blocks

    m_public, m_prepared = m0.clone(), m0.clone()
    prepared = me_mod.prepare_momentum_energy_pass(list(grad), list(m_prepared), 0.9, config=cfg)
    res = prepared.result
    for got in _replay_twice(monkeypatch, prepared, lambda: [m_prepared, res.x, res.energy, res.x_sqnorm]):
        want = me_mod.momentum_energy_pass_(list(grad), list(m_public), 0.9, config=cfg)
        _assert_equal(got, [m_public, want.x, want.energy, want.x_sqnorm])

    ortho = _bf16(count, d_out, d_in, seed=5)
    rs = _rand(count, d_out, gen=gen)
    want = me_mod.column_energy(ortho, row_scale=rs, config=cfg)
    prepared = me_mod.prepare_column_energy(ortho, row_scale=rs, config=cfg)
    for got in _replay_twice(monkeypatch, prepared, lambda: [prepared.result]):
        _assert_equal(got, [want])

    rss_want = up_mod.row_sumsq(ortho)
    prepared = up_mod.prepare_row_sumsq(ortho)
    for got in _replay_twice(monkeypatch, prepared, lambda: [prepared.result]):
        _assert_equal(got, [rss_want])

    v0 = _rand(count, d_out, gen=gen)
    v_public, v_prepared = v0.clone(), v0.clone()
    kw = dict(d_in=d_in, beta2=0.95, eps=1e-8, scale=0.2, lr=0.02, eta_eps=ref.ETA_HAT_EPS)
    prepared = up_mod.prepare_row_stats(v_prepared, rss_want, **kw)
    rowscale, eta = prepared.result
    for got in _replay_twice(monkeypatch, prepared, lambda: [v_prepared, rowscale, eta]):
        want_rs, want_eta = up_mod.row_stats_(v_public, rss_want, **kw)
        _assert_equal(got, [v_public, want_rs, want_eta])

    w0 = _bf16(count, d_out, d_in, seed=6)
    gate = _rand(count, d_in, gen=gen)
    w_public, w_prepared = w0.clone(), w0.clone()
    kw = dict(lr=0.02, weight_decay=0.1, row=up_mod.EtaRows(eta, rowscale), col_gate=gate)
    prepared = up_mod.prepare_update_pass(list(w_prepared), ortho, **kw)
    for got in _replay_twice(monkeypatch, prepared, lambda: [w_prepared]):
        up_mod.update_pass_(list(w_public), ortho, **kw)
        _assert_equal(got, [w_public])


def test_gate_replays(monkeypatch):
    count, d_in = 3, 40
    energy = _rand(count, d_in, gen=torch.Generator().manual_seed(7)) * 10
    energy[:, -2:] *= 1e3  # bursts above the trigger
    kwargs = dict(warmup_steps=0, clip_period=1, clip_alpha=1.0, clip_min=0.7, clip_trigger=3.0,
                  clip_beta=0.9, energy_beta=0.99, energy_eps=1e-12, schedule_free=True, sf_mix=0.3,
                  **gate_args(d_in, 0.5))
    s_public, s_prepared = {}, {}
    for s in (s_public, s_prepared):
        ref.init_gate_state(s, (count,), d_in, True, torch.device(DEVICE))
        s["energy_ref"] = energy.median(dim=-1).values
    # Device scalars: the same launch each step.
    step, lr = torch.tensor(3.0, device=DEVICE), torch.tensor(1e-3, device=DEVICE)
    prepared = gate_mod.prepare_gate_stage(s_prepared, energy, step, lr, first=False, **kwargs)
    keys = ("c_ema", "energy_ref", "sf_lr2_sum", "sf_c_lr2_sum", "c_last")
    for got in _replay_twice(monkeypatch, prepared, lambda: [prepared.result, *(s_prepared[k] for k in keys)]):
        want = gate_mod.gate_stage_(s_public, energy, step, lr, first=False, **kwargs)
        _assert_equal(got, [want, *(s_public[k] for k in keys)])

    want = gate_mod.kth_smallest(energy, 7)
    prepared = gate_mod.prepare_kth_smallest(energy, 7)
    for got in _replay_twice(monkeypatch, prepared, lambda: [prepared.result]):
        _assert_equal(got, [want])


def test_cpu_tensors_are_refused_outside_the_interpreter_unless_planning_for_a_gpu(monkeypatch):
    from trasmuon_kernels._common import check_device
    from trasmuon_kernels._launch import H200, INTERPRETER

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(4)
    for props in (None, INTERPRETER):
        with pytest.raises(RuntimeError, match=r"^x is on cpu; the Triton kernels need CUDA"):
            check_device("x", x, props)
    check_device("x", x, H200)  # the sm_90 compile report plans H200 launches on CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_device("x", x, INTERPRETER)

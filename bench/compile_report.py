"""What the Triton step compiles to on an H200 (sm_90), on a machine without a GPU.

    python bench/compile_report.py --json bench/results/compile_report_sm90_triton-<version>.json
    python bench/compile_report.py --variants --json report.json  # one launch per constexpr variant (CI)

Run it without TRITON_INTERPRET (it refuses otherwise): the kernels must be real
``JITFunction``s. A stand-in Triton driver reports ``GPUTarget("cuda", 90, 32)``, and every
launch is compiled with ``JITFunction.run(..., warmup=True)``: the installed Triton's own
argument specialization (integer divisibility, unit strides, pointer alignment) and the
launch options (warps, stages) of the launch itself, so what is compiled is exactly what a
launch on an H200 would compile. Nothing is executed; the tensors are CPU tensors that are
never touched (``torch.empty``: address space, not memory).

Which launches: ``launches_for`` builds, with the ``prepare_*`` functions and ``H200`` props,
the launches one Triton step issues for a bucket of same-shape matrices (mirroring the matrix
rules' Triton programs, ``trasmuon/rules/_triton_matrix.py``), for every rule (TrasMuon with momentum and O_base energies, NorMuon,
Muon) and for bf16 and fp32 params; plus the kernels the step does not launch but the
package offers (``fro_sumsq``, ``row_sumsq``, ``kth_smallest``). Buckets: the "matrix"
params of the models in ``bench/shapes.py`` grouped by shape as the optimizer groups them,
and 4096x4096, 4096x11008 and a 12x768x3072 stack.

Per compiled variant (launches deduplicated by the compiled kernel's hash, i.e. by Triton's
specialization) the report has the kernel, where it is launched, its config, registers,
spills, shared memory, blocks per SM on sm_90 (from registers, shared memory and warps) and
what the PTX/SASS use: wgmma, TMA (``cp.async.bulk.tensor``), 16-byte global loads
(``ld.global.v4.b32`` / ``cp.async`` of 16 bytes / ``LDG.E.128``, ``LDGSTS.E.*.128``), local
memory. ``check`` lists what breaks the project's rules (tests/test_compile_sm90.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# sm_90 limits (CUDA occupancy calculator, compute capability 9.0).
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
WARP_ALLOC_GRANULARITY = 4
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK_MAX = 227 * 1024
SMEM_RESERVED_PER_BLOCK = 1024  # the system's share of every block (sm_80 and later)

MATRIX_PRODUCTS = ("_sym_gram_kernel", "_ns_apply_kernel")
MEMORY_PASSES = ("_momentum_energy_kernel", "_column_energy_kernel", "_update_kernel",
                 "_row_sumsq_kernel", "_fro_sumsq_kernel", "_adamw_kernel")
VECTOR_KERNELS = ("_finalize_kernel", "_fro_finish_kernel", "_gate_kernel", "_kth_kernel",
                  "_row_stats_kernel", "_namo_factors_kernel")

STANDALONE_BUCKETS: dict[str, tuple[int, int, int]] = {
    # The shapes bench/gpu_newton_schulz.py times, and a stack of MLP matrices.
    "1024x1024": (1, 1024, 1024),
    "2048x2048": (1, 2048, 2048),
    "4096x4096": (1, 4096, 4096),
    "8192x8192": (1, 8192, 8192),
    "4096x11008": (1, 4096, 11008),
    "stack-12x768x3072": (12, 768, 3072),
}
# The report's rules, and the registered rule each one runs (the update-energy variant is
# TrasMuon with energy_source="update").
RULE_OF = {"trasmuon": "trasmuon", "trasmuon-update-energy": "trasmuon", "normuon": "normuon",
           "muon": "muon", "namo": "namo", "namo_d": "namo_d"}
RULES = tuple(RULE_OF)


def install_compile_only_driver(arch: int = 90) -> None:
    """The stand-in driver (``bench/standin_driver.py``, which refuses TRITON_INTERPRET):
    compiles for sm_90, runs nothing."""
    sys.path.insert(0, str(ROOT))
    from bench.standin_driver import install

    install(arch)


# --------------------------------------------------------------------------------------
# The launches of one step
# --------------------------------------------------------------------------------------
def model_buckets() -> dict[str, list[tuple[int, int, int]]]:
    """Per model of bench/shapes.py, its matrix params as buckets: one (count, d_out, d_in)
    per shape, counts summed (the optimizer buckets same-shape matrices of a group)."""
    sys.path.insert(0, str(ROOT))
    from bench.shapes import MODELS

    out = {}
    for model, specs in MODELS.items():
        counts: dict[tuple[int, int], int] = {}
        for shape, count, kind in specs:
            if kind == "matrix":
                counts[shape] = counts.get(shape, 0) + count
        out[model] = [(c, *shape) for shape, c in counts.items()]
    return out


def default_group(rule: str) -> dict[str, Any]:
    """The hyperparameters of ``rule`` (a key of ``RULES``) at their defaults: the registered
    rule's (``trasmuon.rules.get_rule(RULE_OF[rule]).defaults``; docs/rule.md, "Defaults"),
    with energy_source="update" for the update-energy variant. Only their kinds matter to
    what compiles (flags, None or not)."""
    import trasmuon

    if rule not in RULE_OF:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    group = dict(trasmuon.rules.get_rule(RULE_OF[rule]).defaults)
    if rule == "trasmuon-update-energy":
        group["energy_source"] = "update"
    return group


def launches_for(bucket: tuple[int, int, int], param_dtype, rule: str = "trasmuon", props=None) -> list:
    """The launches one Triton optimizer step issues for a bucket of ``count`` (d_out, d_in)
    matrices of ``param_dtype`` under ``rule`` (a key of ``RULES``) on a device with
    ``props`` (default ``H200``), in order. This mirrors what the matrix rules' Triton
    programs prepare (``trasmuon/rules/_triton_matrix.py``): pointer tables of params,
    momenta and grads, the plan's device scalars (lr, per-matrix step counters), the bucket's
    X and O stacks, eta_hat formed in the update pass from ||O_base||_F^2. CPU tensors stand
    in for the device's (never touched)."""
    import torch

    from trasmuon import reference as ref
    from trasmuon_kernels._common import TensorBucket
    from trasmuon_kernels._launch import H200
    from trasmuon_kernels.gate import prepare_gate_stage
    from trasmuon_kernels.momentum_energy import prepare_column_energy, prepare_momentum_energy_pass
    from trasmuon_kernels.newton_schulz import prepare_newton_schulz
    from trasmuon_kernels.update import prepare_row_stats, prepare_update_pass

    props = props or H200
    count, d_out, d_in = bucket
    group = default_group(rule)
    muon = rule == "muon"
    beta1 = group["momentum"] if muon else group["betas"][0]
    lr = torch.tensor(group["lr"])  # the plan's lr: a device scalar
    steps = torch.ones(count)  # the plan's per-matrix step counters (float32)
    params = TensorBucket.of(list(torch.empty(count, d_out, d_in, dtype=param_dtype).unbind(0)), props=props)
    momenta = TensorBucket.of(list(torch.empty(count, d_out, d_in).unbind(0)), props=props)
    grads = TensorBucket.of(list(torch.empty(count, d_out, d_in, dtype=param_dtype).unbind(0)), props=props)
    x = torch.empty(count, d_out, d_in, dtype=torch.bfloat16)
    o = torch.empty_like(x)
    x_sqnorm = torch.empty(count)
    gate_on = not muon and group.get("clip", False) and d_in >= group["clip_min_cols"]
    source = group["energy_source"] if gate_on and group["energy_source"] != "update" else None
    energy = torch.empty(count, d_in) if gate_on else None
    launches: list = []
    if rule in ("namo", "namo_d"):  # the momentum pass, NS and the rest: see _namo_launches
        return _namo_launches(launches, group, rule == "namo_d", params, grads, momenta, x, o,
                              x_sqnorm, lr, steps, props)
    launches += prepare_momentum_energy_pass(
        grads, momenta, beta1, nesterov=group["nesterov"], energy_source=source, x_out=x,
        energy_out=energy if source is not None else None, sqnorm_out=x_sqnorm, props=props)
    schedule = ref.ns_schedule(group["ns_coefficients"], group["ns_steps"])
    row_sumsq = None if muon else torch.empty(count, d_out)
    launches += prepare_newton_schulz(x, schedule, group["eps"], fro_sumsq=x_sqnorm, out=o,
                                      row_sumsq_out=row_sumsq, props=props,
                                      overwrite_input=len(schedule) % 2 == 1)
    if muon:
        factor = ref.muon_lr(1.0, group["adjust_lr_fn"], d_out, d_in)
        launches += prepare_update_pass(params, o, lr=lr, weight_decay=group["weight_decay"],
                                        step_size=lr, step_scale=factor, props=props)
        return launches
    rowscale = torch.empty(count, d_out)
    base_sumsq = torch.empty(count, 1)[:, 0]
    launches += prepare_row_stats(torch.empty(count, d_out), row_sumsq, d_in=d_in, beta2=group["betas"][1],
                                  eps=group["eps"], scale=group["scale"], lr=lr, eta_eps=ref.ETA_HAT_EPS,
                                  rowscale_out=rowscale, sumsq_out=base_sumsq, props=props)
    gate = None
    if gate_on:
        if group["energy_source"] == "update":
            launches += prepare_column_energy(o, row_scale=rowscale, out=energy, props=props)
        state: dict = {}
        ref.init_gate_state(state, (count,), d_in, group["schedule_free"], torch.device("cpu"))
        state["energy_ref"] = torch.zeros(count)
        gate = torch.empty(count, d_in)
        launches += prepare_gate_stage(
            state, energy, steps, lr, k=ref.quantile_rank(d_in, group["energy_quantile"]),
            warmup_steps=group["warmup_steps"], clip_period=group["clip_period"],
            clip_alpha=group["clip_alpha"], clip_min=group["clip_min"],
            clip_trigger=group["clip_trigger"], clip_beta=group["clip_beta"],
            energy_beta=group["energy_beta"], energy_eps=group["energy_eps"],
            schedule_free=group["schedule_free"], sf_mix=group["sf_mix"], sf_eps=ref.SCHEDULE_FREE_EPS,
            first=torch.zeros(count, dtype=torch.uint8), out=gate, props=props)
    launches += prepare_update_pass(
        params, o, lr=lr, weight_decay=group["weight_decay"], rowscale=rowscale,
        o_base_sumsq=base_sumsq, eta_scale=ref.eta_hat_scale(group["scale"], d_out, d_in),
        eta_eps=ref.ETA_HAT_EPS, col_gate=gate, props=props)
    return launches


def _namo_launches(launches, group, columns, params, grads, momenta, x, o, x_sqnorm, lr, steps,
                   props) -> list:
    """NAMO's (``columns=False``) and NAMO-D's launches after the tables and stacks, as
    ``trasmuon/rules/_triton_namo.py`` prepares them."""
    import torch

    from trasmuon import reference as ref
    from trasmuon_kernels.momentum_energy import prepare_momentum_energy_pass
    from trasmuon_kernels.namo import prepare_namo_factors
    from trasmuon_kernels.newton_schulz import prepare_newton_schulz
    from trasmuon_kernels.update import prepare_update_pass

    count, d_out, d_in = x.shape
    grad_sums, n_sums = torch.empty(count, d_in), torch.empty(count, d_in)
    launches += prepare_momentum_energy_pass(
        grads, momenta, group["betas"][0], nesterov=group["nesterov"], energy_source="grad",
        x_out=x, energy_out=grad_sums, sqnorm_out=x_sqnorm, input_energy_out=n_sums, props=props)
    schedule = ref.ns_schedule(group["ns_coefficients"], group["ns_steps"])
    launches += prepare_newton_schulz(x, schedule, ref.NAMO_NS_EPS, fro_sumsq=x_sqnorm, out=o,
                                      props=props, overwrite_input=len(schedule) % 2 == 1)
    v = torch.zeros(count, d_in) if columns else torch.zeros(count)
    factors = prepare_namo_factors(
        v, grad_sums, n_sums, steps, lr, betas=group["betas"], eps=group["eps"],
        weight_decay=group["weight_decay"], scale_shape=ref.namo_shape_factor(group["scale"], d_out, d_in),
        weight_decay_mode=group["weight_decay_mode"], clamp=group["clamp"] if columns else None,
        bias_eps=ref.NAMO_BIAS_EPS, props=props)
    decay, step_up = factors.result
    launches += factors
    if columns:
        launches += prepare_update_pass(params, o, lr=lr, step_size=1.0, col_gate=step_up,
                                        decay=decay, props=props)
    else:
        launches += prepare_update_pass(params, o, lr=lr, step_size=step_up, decay=decay, props=props)
    return launches


def adamw_launches(shapes: list[tuple[int, ...]], param_dtype, props=None) -> list:
    """The one AdamW launch of a step for the non-matrix params of these shapes (as
    ``trasmuon/rules/adamw.py`` prepares it: float32 moments, device lr and steps)."""
    import torch

    from trasmuon_kernels._launch import H200
    from trasmuon_kernels.adamw import prepare_adamw

    params = [torch.empty(s, dtype=param_dtype) for s in shapes]
    return prepare_adamw(params, [torch.empty_like(p) for p in params],
                         [torch.empty(s) for s in shapes], [torch.empty(s) for s in shapes],
                         steps=torch.ones(len(shapes)), lr=torch.tensor(1e-3), betas=(0.9, 0.95),
                         eps=1e-8, weight_decay=0.1, props=props or H200)


def model_others() -> dict[str, list[tuple[int, ...]]]:
    """Per model of bench/shapes.py, the shapes of its non-matrix params (AdamW)."""
    sys.path.insert(0, str(ROOT))
    from bench.shapes import MODELS

    return {model: [shape for shape, count, kind in specs if kind != "matrix" for _ in range(count)]
            for model, specs in MODELS.items()}


def standalone_launches(bucket: tuple[int, int, int], param_dtype, props=None) -> list:
    """Launches of the package's kernels that a step does not issue: Newton-Schulz as its
    public function runs on an input of the param dtype (what bench/gpu_newton_schulz.py
    times: from bf16 X, and from the fp32 momentum), the Frobenius sums of Newton-Schulz
    without ``fro_sumsq`` (of bf16 X and of the fp32 momentum), the row sums of O and the
    k-th smallest energy."""
    import torch

    from trasmuon_kernels._launch import H200
    from trasmuon_kernels.fro_sumsq import prepare_fro_sumsq
    from trasmuon_kernels.gate import prepare_kth_smallest
    from trasmuon_kernels.newton_schulz import prepare_newton_schulz
    from trasmuon_kernels.update import prepare_row_sumsq

    props = props or H200
    count, d_out, d_in = bucket
    launches: list = []
    schedule = ((3.4445, -4.775, 2.0315),) * 5
    launches += prepare_newton_schulz(torch.empty(count, d_out, d_in, dtype=param_dtype), schedule,
                                      1e-7, props=props)
    launches += prepare_fro_sumsq(torch.empty(count, d_out, d_in, dtype=torch.bfloat16), props=props)
    launches += prepare_fro_sumsq(torch.empty(count, d_out, d_in, dtype=param_dtype), props=props)
    launches += prepare_row_sumsq(torch.empty(count, d_out, d_in, dtype=torch.bfloat16), props=props)
    launches += prepare_kth_smallest(torch.empty(count, d_in), max(1, d_in // 2), props=props)
    return launches


@dataclass(frozen=True)
class Site:
    """Where a launch comes from: model (or standalone shape), bucket, param dtype, rule."""

    model: str
    bucket: tuple[int, int, int]
    dtype: str
    rule: str
    in_step: bool

    @property
    def key(self) -> str:
        c, m, n = self.bucket
        where = "step" if self.in_step else "standalone"
        return f"{self.model} {c}x{m}x{n} {self.dtype} {self.rule} ({where})"


def all_sites(dtypes: Iterable[str] = ("bf16", "fp32")) -> Iterator[tuple[Site, list]]:
    """(site, its launches) for every model bucket, standalone bucket, dtype and rule."""
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}
    buckets = dict(model_buckets())
    buckets.update({name: [b] for name, b in STANDALONE_BUCKETS.items()})
    for model, model_bks in buckets.items():
        for bucket in model_bks:
            for dtype in dtypes:
                for rule in RULES:
                    site = Site(model, bucket, dtype, rule, True)
                    yield site, launches_for(bucket, torch_dtype[dtype], rule)
                yield Site(model, bucket, dtype, "-", False), standalone_launches(bucket, torch_dtype[dtype])
    for model, shapes in model_others().items():
        for dtype in dtypes:
            yield Site(model, (len(shapes), 0, 0), dtype, "adamw", True), adamw_launches(
                shapes, torch_dtype[dtype])


# --------------------------------------------------------------------------------------
# Compile and inspect
# --------------------------------------------------------------------------------------
def _nvidia_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas_version() -> str:
    """The ptxas Triton compiles sm_90 with (its bundled one unless TRITON_PTXAS_PATH says)."""
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
    except Exception:  # older Triton: the bundled binary
        path = _nvidia_tool("ptxas")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    release = re.search(r"release [0-9.]+, V[0-9.]+", out)
    return release.group(0) if release else out.strip()[-80:]


def _resource_usage(cubin: bytes) -> tuple[dict[str, int], str]:
    """(cuobjdump's resource usage of the kernel: REG, STACK, SHARED, LOCAL; the SASS)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in usage.splitlines() if "REG:" in ln)
    fields = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
    return fields, sass


def blocks_per_sm(n_regs: int, num_warps: int, shared_bytes: int) -> tuple[int, str]:
    """Resident blocks per SM on sm_90 and what limits them ("registers", "shared", "warps").
    Shared memory counts the kernel's dynamic and static shared memory plus the system's
    1 KiB per block (conservative if cuobjdump's static figure already includes it)."""
    regs_per_warp = math.ceil(max(n_regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    warps_by_regs = (REGS_PER_SM // regs_per_warp) // WARP_ALLOC_GRANULARITY * WARP_ALLOC_GRANULARITY
    limits = {
        "registers": warps_by_regs // num_warps,
        "warps": min(MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM),
    }
    per_block = shared_bytes + SMEM_RESERVED_PER_BLOCK
    limits["shared"] = 0 if shared_bytes > SMEM_PER_BLOCK_MAX else SMEM_PER_SM // per_block
    limiter = min(limits, key=lambda k: limits[k])
    return limits[limiter], limiter


_PTX_LD16 = re.compile(r"\bld\.global(\.[a-z0-9_]+)*\.(v4\.(b32|f32|u32|s32)|v2\.(b64|f64|u64|s64)|v8\.(b16|f16|bf16))\b")
_PTX_ST16 = re.compile(r"\bst\.global(\.[a-z0-9_]+)*\.(v4\.(b32|f32|u32|s32)|v2\.(b64|f64|u64|s64)|v8\.(b16|f16|bf16))\b")
_PTX_CP16 = re.compile(r"\bcp\.async\.c[ga]\.shared\.global[^;]*,\s*(0x10|16)\b")


def inspect(compiled, launch) -> dict[str, Any]:
    """One compiled kernel's facts (see the module docstring)."""
    usage, sass = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    md = compiled.metadata
    num_warps = int(md.num_warps)
    shared = int(md.shared) + usage.get("SHARED", 0)
    blocks, limiter = blocks_per_sm(usage["REG"], num_warps, shared)
    ptx_lines = ptx.splitlines()
    sass_ops = [ln.split("*/", 1)[1] for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    spill_stores = sum(1 for op in sass_ops if re.search(r"\bSTL(\.|\s)", op))
    spill_loads = sum(1 for op in sass_ops if re.search(r"\bLDL(\.|\s)", op))
    constexprs = {k: v for k, v in launch.meta.items() if k.isupper()}
    return {
        "kernel": launch.kernel_name,
        "hash": compiled.hash,
        "config": {**{k: _jsonable(v) for k, v in constexprs.items()},
                   "num_warps": num_warps, "num_stages": int(md.num_stages),
                   **({"maxnreg": md.maxnreg} if getattr(md, "maxnreg", None) else {})},
        "n_regs": usage["REG"],
        "n_spills": spill_stores + spill_loads,
        "spill_stores": spill_stores,
        "spill_loads": spill_loads,
        "stack_bytes": usage.get("STACK", 0),
        "local_bytes": usage.get("LOCAL", 0),
        "shared_bytes": shared,
        "blocks_per_sm": blocks,
        "blocks_limited_by": limiter,
        "wgmma": sum("wgmma.mma_async" in ln for ln in ptx_lines),
        "tma": sum("cp.async.bulk.tensor" in ln for ln in ptx_lines),
        "ld_global_16B": sum(bool(_PTX_LD16.search(ln)) for ln in ptx_lines),
        "ld_global_narrow": sum(("ld.global" in ln and not _PTX_LD16.search(ln)) for ln in ptx_lines),
        "cp_async_16B": sum(bool(_PTX_CP16.search(ln)) for ln in ptx_lines),
        "st_global_16B": sum(bool(_PTX_ST16.search(ln)) for ln in ptx_lines),
        "st_global_narrow": sum(("st.global" in ln and not _PTX_ST16.search(ln)) for ln in ptx_lines),
        "sass_LDG_128": sum(1 for op in sass_ops if re.search(r"\bLDG\.E[.A-Z0-9_]*\.128\b", op)),
        "sass_LDGSTS_128": sum(1 for op in sass_ops if re.search(r"\bLDGSTS\.E[.A-Z0-9_]*\.128\b", op)),
        "sass_STG_128": sum(1 for op in sass_ops if re.search(r"\bSTG\.E[.A-Z0-9_]*\.128\b", op)),
        "local_memory": bool(usage.get("LOCAL", 0) or usage.get("STACK", 0) or spill_stores or spill_loads
                             or re.search(r"\b(ld|st)\.local\b", ptx)),
    }


def _jsonable(value):
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


@dataclass(frozen=True)
class CompileJob:
    """A launch reduced to what its compilation depends on, small enough to send to a worker
    process: the kernel (module and name), the launch options and constexprs, and the
    arguments, with every tensor replaced by a 16-element tensor of the same dtype and the
    same address alignment (a kernel's tensor arguments are typed by dtype and specialized
    on 16-byte alignment only; shapes and strides are separate integer arguments)."""

    module: str
    kernel: str
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: tuple[tuple[str, Any], ...]

    @property
    def key(self) -> tuple:
        """What Triton specializes on: dtypes and 16-byte alignment of pointers, integers
        equal to 1 or divisible by 16 (and their width), and the constexprs/options."""

        def sig(a):
            if hasattr(a, "data_ptr"):
                return ("ptr", str(a.dtype), a.data_ptr() % 16 == 0)
            if isinstance(a, bool):
                return ("bool", a)
            if isinstance(a, int):
                return ("int", a == 1, a % 16 == 0, -(2**31) <= a < 2**31)
            return (type(a).__name__,)

        return (self.module, self.kernel, self.meta, tuple(sig(a) for a in self.args))

    @property
    def variant_key(self) -> tuple:
        """The kernel/constexpr variant: constexprs, options and which integer arguments are 1
        (unit strides: the wide and the tall products differ there), not the divisibility and
        alignment facts that ``key`` adds."""
        ints = tuple(a == 1 for a in self.args if isinstance(a, int) and not isinstance(a, bool))
        return (self.module, self.kernel, self.meta, ints)


def _stand_in(tensor):
    import torch

    size = tensor.element_size()
    offset = (tensor.data_ptr() % 16) // size
    base = torch.zeros(16 + 16 // size, dtype=tensor.dtype)  # torch's CPU allocations are 64-byte aligned
    return base[offset:offset + 16]


def compile_job_of(launch, *, uncapped: bool = False) -> CompileJob:
    """``launch`` as a job; ``uncapped``: without its ``maxnreg`` (what the kernel needs when
    the compiler is free to use more registers)."""
    import torch

    fn = launch.kernel.fn
    args = tuple(_stand_in(a) if isinstance(a, torch.Tensor) else a for a in launch.args)
    meta = {k: v for k, v in launch.meta.items() if not (uncapped and k == "maxnreg")}
    return CompileJob(fn.__module__, fn.__name__, tuple(launch.grid), args, tuple(sorted(meta.items())))


def compile_job(job: CompileJob) -> dict[str, Any]:
    """Compile ``job`` as its launch would (``JITFunction.run(..., warmup=True)``: nothing
    runs) and inspect the result."""
    import importlib

    from trasmuon_kernels._launch import Launch

    install_compile_only_driver()
    kernel = getattr(importlib.import_module(job.module), job.kernel)
    launch = Launch(kernel, job.grid, job.args, dict(job.meta))
    compiled = kernel.run(*job.args, grid=job.grid, warmup=True, **dict(job.meta))
    return inspect(compiled, launch)


def _worker_init(root: str) -> None:
    sys.path.insert(0, root)
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    install_compile_only_driver()


# What a report's compiled facts depend on besides the installed Triton: the kernels and
# their launchers and configs, the models' shapes, and this script's mirror of the programs.
REPORT_SOURCES = ("trasmuon_kernels/*.py", "bench/shapes.py", "bench/compile_report.py")


def report_sources() -> dict[str, str]:
    """sha256 of every file a report depends on (``REPORT_SOURCES``), by path: stored in the
    report, so that a test can tell a committed report from a stale one without compiling."""
    import hashlib

    files = sorted({f for pattern in REPORT_SOURCES for f in ROOT.glob(pattern)})
    return {f.relative_to(ROOT).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def build_report(*, dtypes: Iterable[str] = ("bf16", "fp32"), workers: int | None = None,
                 variants: bool = False, uncapped: bool = False, log=print) -> dict[str, Any]:
    """Compile every distinct specialization among the launches of ``all_sites`` (in
    ``workers`` processes, default one per CPU) and return the report. ``variants``: compile
    one launch per kernel/constexpr variant only (``CompileJob.variant_key``; what CI runs).
    ``uncapped``: compile without the configs' ``maxnreg`` caps (to see what they prevent)."""
    import multiprocessing

    import torch
    import triton

    from trasmuon_kernels._launch import H200, Launch

    install_compile_only_driver()
    start = time.perf_counter()
    jobs: dict[tuple, CompileJob] = {}
    sites: dict[tuple, list[str]] = {}
    n_launches = 0
    for site, launches in all_sites(dtypes):
        for launch in launches:
            if not isinstance(launch, Launch):
                continue  # torch reductions over partial sums: not ours to compile
            n_launches += 1
            job = compile_job_of(launch, uncapped=uncapped)
            key = job.variant_key if variants else job.key
            jobs.setdefault(key, job)
            where = sites.setdefault(key, [])
            if site.key not in where:
                where.append(site.key)
    keys = list(jobs)
    workers = max(1, min(workers or os.cpu_count() or 1, len(keys)))
    if workers == 1:
        _worker_init(str(ROOT))
        results = [compile_job(jobs[k]) for k in keys]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_worker_init, initargs=(str(ROOT),)) as pool:
            results = pool.map(compile_job, [jobs[k] for k in keys], chunksize=1)
    rows: dict[str, dict[str, Any]] = {}
    for key, row in zip(keys, results, strict=True):
        merged = rows.setdefault(row["hash"], {**row, "sites": []})
        merged["sites"] += [s for s in sites[key] if s not in merged["sites"]]
    for row in rows.values():
        log(_row_line(row))
    return {
        "target": "sm_90 (GPUTarget('cuda', 90, 32)), H200 launch configs",
        "props": {"kind": H200.kind, "sm_count": H200.sm_count, "capability": list(H200.capability)},
        "triton": triton.__version__,
        "ptxas": _ptxas_version(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "mode": ("one launch per kernel/constexpr variant" if variants else "every specialization")
        + (", maxnreg caps removed" if uncapped else ""),
        "launches": n_launches,
        "seconds": round(time.perf_counter() - start, 1),
        "sources": report_sources(),
        "variants": sorted(rows.values(), key=lambda r: (r["kernel"], str(r["config"]), r["hash"])),
    }


# --------------------------------------------------------------------------------------
# The project's rules
# --------------------------------------------------------------------------------------
def check(report: dict[str, Any]) -> list[str]:
    """What breaks the rules: every matrix product uses wgmma; memory passes use 16-byte
    global loads; no kernel spills or uses local memory; every kernel fits two blocks per SM
    (one block's epilogue or tail overlaps the other's loads)."""
    problems = []
    for row in report["variants"]:
        name, cfg = row["kernel"], row["config"]
        where = f"{name} {cfg} ({row['sites'][0] if row.get('sites') else '?'})"
        if row["n_spills"] or row["local_memory"]:
            problems.append(f"{where}: {row['n_spills']} spill instructions, local memory "
                            f"{row['local_bytes']} B, stack {row['stack_bytes']} B")
        if row["blocks_per_sm"] < 2:
            problems.append(f"{where}: {row['n_regs']} registers, {row['shared_bytes']} B shared: "
                            f"{row['blocks_per_sm']} block(s) per SM (limited by {row['blocks_limited_by']})")
        if name in MATRIX_PRODUCTS and not row["wgmma"]:
            problems.append(f"{where}: no wgmma")
        if name in MEMORY_PASSES and not (row["ld_global_16B"] or row["sass_LDG_128"]):
            problems.append(f"{where}: no 16-byte global loads")
    return problems


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------
def _tile(cfg: dict[str, Any]) -> str:
    if "BLOCK_M" in cfg:
        return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}"
    if "BLOCK_K" in cfg:  # the symmetric product: square tiles
        return f"{cfg['BLOCK']}x{cfg['BLOCK']}x{cfg['BLOCK_K']}"
    if "BLOCK_R" in cfg:
        return f"{cfg['BLOCK_R']}x{cfg['BLOCK_C']}"
    if "ROWS" in cfg:
        return f"{cfg['ROWS']}x{cfg['BLOCK_C']}"
    return str(cfg.get("BLOCK", "?"))


def _short_config(cfg: dict[str, Any]) -> str:
    flags = [k for k, v in cfg.items() if v is True and not k.endswith("ALIGNED")]
    cap = f" maxnreg {cfg['maxnreg']}" if cfg.get("maxnreg") else ""
    return f"{_tile(cfg)} w{cfg['num_warps']} s{cfg['num_stages']}{cap}" + (f" {','.join(flags)}" if flags else "")


def _row_line(row: dict[str, Any]) -> str:
    loads = row["ld_global_16B"] + row["cp_async_16B"]
    return (f"{row['kernel']:24s} {_short_config(row['config'])[:58]:58s} regs {row['n_regs']:3d} "
            f"spills {row['n_spills']} smem {row['shared_bytes'] // 1024:3d}K blocks/SM "
            f"{row['blocks_per_sm']:2d} ({row['blocks_limited_by'][:4]}) wgmma {'y' if row['wgmma'] else '-'} "
            f"tma {'y' if row['tma'] else '-'} 16B-loads {loads}")


def summary(report: dict[str, Any]) -> str:
    """A short table: per kernel, the variants' register range and worst blocks per SM."""
    lines = [f"Triton {report['triton']} (ptxas {report.get('ptxas', '?')}), {report['target']}: "
             f"{len(report['variants'])} compiled variants from {report['launches']} launches in "
             f"{report['seconds']} s ({report.get('mode', '')})",
             f"{'kernel':24s} {'variants':>8s} {'regs':>9s} {'spills':>6s} {'min blocks/SM':>13s} "
             f"{'wgmma':>5s} {'tma':>3s} {'16B loads':>9s}"]
    kernels = sorted({r["kernel"] for r in report["variants"]})
    for name in kernels:
        rows = [r for r in report["variants"] if r["kernel"] == name]
        regs = sorted(r["n_regs"] for r in rows)
        lines.append(
            f"{name:24s} {len(rows):8d} {regs[0]:4d}-{regs[-1]:<4d} {sum(r['n_spills'] for r in rows):6d} "
            f"{min(r['blocks_per_sm'] for r in rows):13d} "
            f"{sum(bool(r['wgmma']) for r in rows):2d}/{len(rows):<2d} {sum(bool(r['tma']) for r in rows):3d} "
            f"{sum(bool(r['ld_global_16B'] or r['cp_async_16B'] or r['sass_LDG_128']) for r in rows):4d}/{len(rows):<4d}")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in report["variants"]:
        if r["kernel"] in MATRIX_PRODUCTS and _tile(r["config"]).startswith("128x128"):
            groups.setdefault((r["kernel"], _short_config(r["config"])), []).append(r)
    if groups:
        lines.append("128x128 products (registers over the variants, fewest blocks per SM):")
    for (name, cfg), rows in sorted(groups.items()):
        regs = sorted(r["n_regs"] for r in rows)
        lines.append(f"  {name:18s} {cfg[:52]:52s} regs {regs[0]}-{regs[-1]} spills "
                     f"{sum(r['n_spills'] for r in rows)} smem {rows[0]['shared_bytes'] // 1024} KiB "
                     f"blocks/SM {min(r['blocks_per_sm'] for r in rows)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    ap.add_argument("--workers", type=int, default=None, help="compile processes (default: one per CPU)")
    ap.add_argument("--variants", action="store_true",
                    help="one launch per kernel/constexpr variant (about half the compiles; CI)")
    ap.add_argument("--uncapped", action="store_true",
                    help="compile without the configs' maxnreg caps (not what a launch compiles)")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--quiet", action="store_true", help="no line per compiled variant")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    report = build_report(dtypes=args.dtypes.split(","), workers=args.workers, variants=args.variants,
                          uncapped=args.uncapped, log=(lambda _: None) if args.quiet else print)
    report["problems"] = check(report)
    print(summary(report))
    for p in report["problems"]:
        print("PROBLEM:", p)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

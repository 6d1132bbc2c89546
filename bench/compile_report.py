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

Which launches: those of one real step (``step_launches``). For every model of
``bench/shapes.py`` (GPT-2 small and medium, Qwen3-0.6B, Llama-3.2-1B, ViT-B) and every
standalone shape that bench/gpu_newton_schulz.py times (1024^2 to 8192^2, 4096x11008, a
12x768x3072 bucket), for every rule (``RULES``: the registry's matrix rules, and TrasMuon
with update energies, with Gram Newton–Schulz and with bf16 momentum, ``OPTION_VARIANTS``) and for bf16 and fp32 params, an optimizer is built over the model's
params (matrices under the rule, the rest under AdamW) as if they lived on an H200
(``simulate_device``) and steps once inside ``capture_launches``: the rules' own Triton
programs prepare every launch, and none runs. Plus the kernels the step does not launch but
the package offers (``newton_schulz`` from a bf16 or fp32 input, ``fro_sumsq``, ``row_sumsq``,
``kth_smallest``) per matrix shape. The params and gradients are never-touched
``torch.empty`` CPU tensors; the optimizer's state is allocated (a 1B model's takes a few GB
for a moment: one model, rule and dtype at a time).

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
import pickle
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

import torch

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
# The report's rules: every matrix rule of the registry at its defaults, and the options that
# launch other kernels or configs, as (registered rule, group keys over its defaults).
OPTION_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "trasmuon-update-energy": ("trasmuon", {"energy_source": "update"}),
    "trasmuon-gram": ("trasmuon", {"ns_method": "gram"}),
    # bf16 momentum with stochastic rounding: the momentum pass's SR variants
    "trasmuon-bf16-state": ("trasmuon", {"state_dtype": torch.bfloat16, "seed": 0}),
    "muon-bf16-state": ("muon", {"state_dtype": torch.bfloat16, "seed": 0}),
    "namo_d-bf16-state": ("namo_d", {"state_dtype": torch.bfloat16, "seed": 0}),
}


def _rule_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    sys.path.insert(0, str(ROOT))
    from trasmuon.rules import MATRIX_RULES

    return {**{name: (name, {}) for name in MATRIX_RULES}, **OPTION_VARIANTS}


RULE_VARIANTS = _rule_variants()
RULE_OF = {name: rule for name, (rule, _) in RULE_VARIANTS.items()}
RULES = tuple(RULE_VARIANTS)
DEFAULT_DTYPES = "bf16,fp32"


def install_compile_only_driver(arch: int = 90) -> None:
    """The stand-in driver (``bench/standin_driver.py``, which refuses TRITON_INTERPRET):
    compiles for sm_90, runs nothing."""
    sys.path.insert(0, str(ROOT))
    from bench.standin_driver import install

    install(arch)


# --------------------------------------------------------------------------------------
# The launches of one step
# --------------------------------------------------------------------------------------
def default_group(rule: str) -> dict[str, Any]:
    """The hyperparameters of ``rule`` (a key of ``RULES``): the registered rule's defaults
    (``trasmuon.rules.get_rule(RULE_OF[rule]).defaults``; docs/rule.md, "Defaults") with the
    variant's keys over them (``OPTION_VARIANTS``)."""
    import trasmuon

    if rule not in RULE_VARIANTS:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    registered, keys = RULE_VARIANTS[rule]
    return {**trasmuon.rules.get_rule(registered).defaults, **keys}


def report_models() -> dict[str, list]:
    """The parameter sets the report steps: the models of bench/shapes.py, and one bucket per
    standalone shape (``STANDALONE_BUCKETS``: that many matrices of that shape)."""
    sys.path.insert(0, str(ROOT))
    from bench.shapes import MODELS

    models = dict(MODELS)
    for name, (count, d_out, d_in) in STANDALONE_BUCKETS.items():
        models[name] = [((d_out, d_in), count, "matrix")]
    return models


def step_launches(specs: list, param_dtype, rule: str, props=None) -> list[tuple[str, list]]:
    """The launches of one Triton optimizer step, from the rules' own programs: an optimizer
    over ``specs`` (bench/shapes.py's (shape, count, kind); matrices under ``rule``, a key of
    ``RULES``, at its defaults; every other param under AdamW) with ``param_dtype`` params,
    planned for a device with ``props`` (default ``H200``, ``simulate_device``), steps once
    while ``capture_launches`` collects every launch without running it. Returns, per bucket
    of the plan in launch order, its label ("count x d_out x d_in", "adamw N params", or
    "plan" for launches of no bucket) and its launches.

    The tensors are CPU tensors: params and gradients ``torch.empty`` (address space, never
    touched: nothing runs), the state whatever the plan allocates."""
    import torch

    import trasmuon
    from trasmuon_kernels._launch import H200, capture_launches, simulate_device

    matrices, others = [], []
    for shape, count, kind in specs:
        for _ in range(count):
            p = torch.nn.Parameter(torch.empty(shape, dtype=param_dtype))
            p.grad = torch.empty_like(p)
            (matrices if kind == "matrix" else others).append(p)
    groups = [{"params": matrices, "rule": RULE_OF[rule], **default_group(rule)}]
    if others:
        groups.append({"params": others, "rule": "adamw"})
    with simulate_device(props or H200):
        opt = trasmuon.TrasMuon(groups, backend="triton")
        with capture_launches() as launches:
            opt.step()
    owner: dict[int, str] = {}
    for b in opt._plan.buckets:
        label = (f"adamw {len(b.params)} params" if b.rule.name == "adamw"
                 else "x".join(map(str, (len(b.params), *b.shape))))
        for value in vars(b.program).values():  # the program's launch lists
            if isinstance(value, list):
                owner.update((id(item), label) for item in value)
    out: list[tuple[str, list]] = []
    for launch in launches:
        label = owner.get(id(launch), "plan")
        if not out or out[-1][0] != label:
            out.append((label, []))
        out[-1][1].append(launch)
    return out


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
    """Where a launch comes from: model (or standalone shape), bucket ("count x d_out x d_in",
    "adamw N params"), param dtype, rule, and whether an optimizer step issues it."""

    model: str
    bucket: str
    dtype: str
    rule: str
    in_step: bool

    @property
    def key(self) -> str:
        where = "step" if self.in_step else "standalone"
        return f"{self.model} {self.bucket} {self.dtype} {self.rule} ({where})"


def all_sites(dtypes: Iterable[str] = ("bf16", "fp32"), models: Iterable[str] | None = None,
              rules: Iterable[str] = RULES) -> Iterator[tuple[Site, list]]:
    """(site, its launches) for every model of ``report_models`` (or ``models``), dtype and
    rule: the launches of one real step (``step_launches``), one model, dtype and rule at a
    time (a 1B model's state is allocated, then freed); and per matrix shape, the package's
    launches that a step does not issue (``standalone_launches``)."""
    import gc

    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}
    all_models = report_models()
    for model in (list(all_models) if models is None else list(models)):
        specs = all_models[model]
        for dtype in dtypes:
            for rule in rules:
                for label, launches in step_launches(specs, torch_dtype[dtype], rule):
                    yield Site(model, label, dtype, "adamw" if label.startswith("adamw") else rule, True), launches
                gc.collect()  # the step's state, before the next rule's
            counts: dict[tuple[int, ...], int] = {}
            for shape, count, kind in specs:
                if kind == "matrix":
                    counts[shape] = counts.get(shape, 0) + count
            for (d_out, d_in), count in counts.items():
                yield (Site(model, f"{count}x{d_out}x{d_in}", dtype, "-", False),
                       standalone_launches((count, d_out, d_in), torch_dtype[dtype]))


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
# their launchers and configs, the code that prepares a step's launches (the plan's device
# scalars, the rules and their Triton programs), the models' shapes, and this script.
REPORT_SOURCES = ("trasmuon_kernels/*.py", "trasmuon/plan.py", "trasmuon/rules/*.py",
                  "bench/shapes.py", "bench/compile_report.py")


def report_sources() -> dict[str, str]:
    """sha256 of every file a report depends on (``REPORT_SOURCES``), by path: stored in the
    report, so that a test can tell a committed report from a stale one without compiling."""
    import hashlib

    files = sorted({f for pattern in REPORT_SOURCES for f in ROOT.glob(pattern)})
    return {f.relative_to(ROOT).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@dataclass
class JobList:
    """The distinct compilations of a report and where each is launched: what a report is
    made from. It does not depend on the installed Triton (the launch configs are functions
    of shapes and device properties), so one list serves every Triton version
    (``--save-jobs`` / ``--jobs``: CI collects it once for 3.9 and 3.6)."""

    jobs: dict[tuple, CompileJob]
    sites: dict[tuple, list[str]]
    launches: int
    mode: str
    seconds: float


def collect_jobs(*, dtypes: Iterable[str] = ("bf16", "fp32"), variants: bool = False,
                 uncapped: bool = False) -> JobList:
    """The compile jobs of every launch of ``all_sites``, deduplicated by Triton's
    specialization (``CompileJob.key``) or, with ``variants``, by kernel/constexpr variant
    only (``CompileJob.variant_key``; what CI runs). ``uncapped``: without the configs'
    ``maxnreg`` caps (to see what they prevent)."""
    from trasmuon_kernels._launch import Launch

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
    mode = ("one launch per kernel/constexpr variant" if variants else "every specialization") + (
        ", maxnreg caps removed" if uncapped else "")
    return JobList(jobs, sites, n_launches, mode, round(time.perf_counter() - start, 1))


def build_report(job_list: JobList, *, workers: int | None = None, log=print) -> dict[str, Any]:
    """Compile every job of ``job_list`` (in ``workers`` processes, default one per CPU) with
    the installed Triton and return the report."""
    import multiprocessing

    import torch
    import triton

    from trasmuon_kernels._launch import H200

    install_compile_only_driver()
    start = time.perf_counter()
    jobs, sites = job_list.jobs, job_list.sites
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
        "mode": job_list.mode,
        "launches": job_list.launches,
        "steps_seconds": job_list.seconds,  # building the plans and collecting their launches
        "seconds": round(time.perf_counter() - start, 1),  # compiling
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
             f"{len(report['variants'])} compiled variants from {report['launches']} launches "
             f"(steps {report.get('steps_seconds', '?')} s, compiles {report['seconds']} s; "
             f"{report.get('mode', '')})",
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
    ap.add_argument("--dtypes", default=DEFAULT_DTYPES)
    ap.add_argument("--save-jobs", type=Path, default=None,
                    help="also write the compile jobs here (pickle), for --jobs")
    ap.add_argument("--jobs", type=Path, default=None,
                    help="compile the jobs of a --save-jobs file instead of stepping the models "
                         "again (the list does not depend on the Triton version)")
    ap.add_argument("--quiet", action="store_true", help="no line per compiled variant")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.jobs:
        if args.variants or args.uncapped or args.dtypes != DEFAULT_DTYPES:
            ap.error("--jobs replaces --variants, --uncapped and --dtypes (the list was made with them)")
        job_list = pickle.loads(args.jobs.read_bytes())
    else:
        job_list = collect_jobs(dtypes=args.dtypes.split(","), variants=args.variants, uncapped=args.uncapped)
    if args.save_jobs:
        args.save_jobs.write_bytes(pickle.dumps(job_list))
    report = build_report(job_list, workers=args.workers, log=(lambda _: None) if args.quiet else print)
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

"""The Triton programs of the matrix rules: every launch of a bucket prepared once per plan.

A program holds, for its bucket of B matrices (this rank's rows of each):

* device tables of the parameters', momenta's and gradients' addresses (the gradient table is
  rewritten in place when gradients move, ``begin``);
* the Newton–Schulz input X and its output O as (B, rows, d_in) bf16 stacks, and the small
  per-matrix state (``row_v``, the gate state) stacked, with ``optimizer.state`` entries as
  views of the stacks (so checkpoints keep their per-parameter layout);
* lr and the step counters as device scalars of the plan (``trasmuon.plan``).

Every launch reads what changes between steps from device memory, so two steps issue the same
launches with the same arguments, and a step can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import reference as ref
from ..layout import Block, block_view, row_sums_view
from ..plan import DTensor, ExpertState
from . import Program
from ._diagnostics import matrix_diagnostics
from ._matrix import PointerTable, gram_restarts, ns_blocks

if TYPE_CHECKING:
    from ..plan import Bucket, StepPlan


_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reason(group: Mapping[str, Any], param: Tensor, grad: Tensor) -> str | None:
    """Why a matrix cannot take the Triton program (None when it can)."""
    if group["ns_dtype"] != torch.bfloat16:
        return f"ns_dtype={group['ns_dtype']} (the Newton-Schulz kernels are bf16)"
    if param.dtype not in _FLOAT:
        return f"its dtype is {param.dtype} (the kernels take fp32, bf16 and fp16 params)"
    if grad.dtype not in _FLOAT:
        return f"its gradient dtype is {grad.dtype}"
    return None


def stack_state(bucket: Bucket, key: str, shape: tuple[int, ...], fill: float) -> Tensor:
    """One contiguous (B, *shape) float32 stack on the bucket's device whose rows become the
    state entries ``key`` of its parameters (existing values are copied in, missing ones start
    at ``fill``). A DTensor entry stays a DTensor whose local tensor is its row."""
    stack = torch.full((bucket.count, *shape), fill, dtype=torch.float32, device=bucket.device)
    for i, state in enumerate(bucket.states):
        old = state.get(key)
        if isinstance(state, ExpertState):  # a stack's experts are consecutive members
            if old is not None:
                stack[i].copy_(old)
            if state.expert == state.experts - 1:
                bind_rows(state, key, stack[i + 1 - state.experts:i + 1])
            continue
        if isinstance(old, DTensor):
            stack[i].copy_(old.to_local())
            state[key] = DTensor.from_local(stack[i], old.device_mesh, old.placements,
                                            run_check=False, shape=old.shape, stride=old.stride())
        else:
            if old is not None:
                stack[i].copy_(old)
            state[key] = stack[i]
    return stack


def bind_rows(state: ExpertState, key: str, rows: Tensor) -> None:
    """A stacked parameter's entry ``key`` becomes ``rows`` (a DTensor over them when the
    stack is sharded over experts)."""
    old = state.base.get(key)
    if isinstance(old, DTensor):
        rows = DTensor.from_local(rows, old.device_mesh, old.placements, run_check=False,
                                  shape=old.shape, stride=old.stride())
    state.bind(key, rows)


class TritonMatrixProgram(Program):
    """What every matrix rule's Triton program shares: tables, stacks, scalars, the momentum
    pass and Newton–Schulz. Subclasses prepare ``post_launches`` and ``finish_launches``."""

    # Columns of the momentum pass's energies: None, "momentum" or "grad".
    energy_source: str | None = None

    def __init__(self, bucket: Bucket, plan: StepPlan) -> None:
        self.bucket = bucket
        self.plan = plan
        self.lr_slot = plan.devices.lr_slot(bucket.device, bucket.group_index, bucket.group)
        self.counter = plan.devices.reserve_counters(bucket.device, bucket.states)
        self.pass1: list[Any] = []
        self.ns: list[Any] = []
        self.post_launches: list[Any] = []
        self.finish_launches: list[Any] = []

    # ------------------------------------------------------------------------------
    def build(self) -> None:
        from trasmuon_kernels._launch import device_props
        from trasmuon_kernels.momentum_energy import prepare_momentum_energy_pass

        b = self.bucket
        g = b.group
        self.props = device_props(b.device)
        self.lr = self.plan.devices.lr_tensor(b.device, self.lr_slot)
        self.steps = self.plan.devices.counter_view(b.device, self.counter, b.count)
        states = b.rule_states()
        self.param_table = PointerTable(b.views())
        self.momentum_table = PointerTable([s["momentum"] for s in states])
        self.grad_table = PointerTable(b.grads(), stand_in=True)
        rows, cols = b.block.shape
        self.x = torch.empty(b.count, rows, cols, dtype=torch.bfloat16, device=b.device)
        self.o = torch.empty_like(self.x)
        self.x_sqnorm = torch.empty(b.count, dtype=torch.float32, device=b.device)
        self.row_sumsq = (torch.empty(b.count, rows, dtype=torch.float32, device=b.device)
                          if b.rule.needs_row_sumsq else None)
        b.ns_input = self.x
        sr = {}
        if b.momentum_dtype == torch.bfloat16:  # stochastic rounding keyed as the eager path
            keys = [k - (1 << 32) if k >= 1 << 31 else k for k in b.sr_keys]  # int32 bit patterns
            self.sr_keys = torch.tensor(keys, dtype=torch.int32).to(b.device)
            sr = dict(sr_keys=self.sr_keys, sr_steps=self.steps,
                      sr_offset=(b.block.rows[0], b.block.cols[0]), sr_d_in=b.shape[1])
        self.pass1 = prepare_momentum_energy_pass(
            self.grad_table.bucket, self.momentum_table.bucket, self.beta1(), nesterov=g["nesterov"],
            energy_source=self.energy_source, x_out=self.x,
            energy_out=self.pass1_energy_view(self.pass1_energy_out()), sqnorm_out=self.x_sqnorm,
            props=self.props, input_energy_out=self.pass1_energy_view(self.pass1_input_energy_out()),
            # A block of X must keep its scale: its owner normalizes the assembled matrix.
            rescale_overflow=b.layout is None, **sr)
        # (Blocks of matrices that span ranks are orthogonalized by their owner.)
        self.ns = self._ns(self.x, self.o, self.x_sqnorm, self.row_sumsq) if b.layout is None else []
        self.build_rule()

    def beta1(self) -> float:
        return self.bucket.group["betas"][0]

    def pass1_energy_out(self) -> Tensor | None:
        """Where the momentum pass writes the column energies of ``energy_source``."""
        return None

    def pass1_input_energy_out(self) -> Tensor | None:
        """Where it writes the column energies of the float32 Newton-Schulz input (None: not)."""
        return None

    def build_rule(self) -> None:
        raise NotImplementedError

    def pass1_energy_view(self, energy: Tensor | None) -> Tensor | None:
        """This rank's columns of a (B, d_in) per-column sum."""
        return None if energy is None else energy[:, self.bucket.cols]

    def _ns(self, x: Tensor, out: Tensor, fro: Tensor | None, row_sumsq: Tensor | None) -> list[Any]:
        """The launches of Newton–Schulz from the (B, d_out, d_in) bf16 stack ``x`` of whole
        matrices into ``out`` (and O's row sums of squares into ``row_sumsq`` (B, d_out)).
        ``fro``: the matrices' ||X||_F^2 from the momentum pass, or None (the NS computes it).
        With the group's ``ns_blocks`` every block is a matrix of its own (``_blocked_ns``)."""
        blocks = ns_blocks(self.bucket.group)
        if blocks != ref.DEFAULT_NS_BLOCKS:
            return self._blocked_ns(x, out, row_sumsq, blocks)
        return self._ns_stack(x, out, fro, row_sumsq)

    def _blocked_ns(self, x: Tensor, out: Tensor, row_sumsq: Tensor | None,
                    blocks: tuple[int, int]) -> list[Any]:
        """Newton–Schulz of every block of every matrix of the stack as one batch of
        (d_out / rb, d_in / cb) matrices, each normalized by its own norm (so the momentum
        pass's per-matrix ``fro`` is not used: the NS reduces the blocks' norms itself).

        Row blocks only (cb = 1): the stacks are viewed as (B * rb, d_out / rb, d_in), no copy,
        and the blocks' row sums are the rows' sums. Column blocks: the kernels take one batch
        stride, which cannot step over a (rb, cb) grid inside a matrix, so X is copied into a
        block-major stack before (one torch copy), O copied back into the matrix layout after
        (one copy), and the row sums of the cb blocks of a row are added (one torch sum)."""
        from trasmuon_kernels._launch import TorchLaunch

        count, m, n = x.shape
        rb, cb = blocks
        bm, bn = ref.ns_block_shape((m, n), blocks)
        if cb == 1:
            rs = None if row_sumsq is None else row_sumsq.view(count * rb, bm)
            return list(self._ns_stack(x.view(count * rb, bm, n), out.view(count * rb, bm, n),
                                       None, rs))
        dev = x.device
        xb = torch.empty(count * rb * cb, bm, bn, dtype=torch.bfloat16, device=dev)
        ob = torch.empty_like(xb)
        rs = (None if row_sumsq is None
              else torch.empty(count * rb * cb, bm, dtype=torch.float32, device=dev))
        # (count, rb, cb, bm, bn) block-major stacks, and the matrices seen as that grid.
        xb_grid, ob_grid = xb.view(count, rb, cb, bm, bn), ob.view(count, rb, cb, bm, bn)
        x_grid = x.view(count, rb, bm, cb, bn).movedim(3, 2)
        out_grid = out.view(count, rb, bm, cb, bn).movedim(3, 2)
        launches = [TorchLaunch("copy(ns_blocks in)", lambda: xb_grid.copy_(x_grid), (xb, x))]
        launches += self._ns_stack(xb, ob, None, rs)
        launches.append(TorchLaunch("copy(ns_blocks out)", lambda: out_grid.copy_(ob_grid), (out, ob)))
        if row_sumsq is not None:
            rs_grid, rows = rs.view(count, rb, cb, bm), row_sumsq.view(count, rb, bm)
            launches.append(TorchLaunch("sum(ns_blocks row_sumsq)",
                                        lambda: torch.sum(rs_grid, dim=2, out=rows), (row_sumsq, rs)))
        return launches

    def _ns_stack(self, x: Tensor, out: Tensor, fro: Tensor | None,
                  row_sumsq: Tensor | None) -> list[Any]:
        """Newton–Schulz of the (B, m, n) stack ``x``, each matrix as a whole, in the form the
        group's ``ns_method`` picks for (m, n)."""
        from trasmuon_kernels.newton_schulz import prepare_newton_schulz

        b = self.bucket
        schedule = b.rule.ns_schedule(b.group)
        restarts = gram_restarts(b.group, tuple(x.shape[-2:]))  # the form ns_method picks
        if restarts is not None:
            from trasmuon_kernels.gram_newton_schulz import prepare_gram_newton_schulz

            return prepare_gram_newton_schulz(
                x, schedule, b.rule.ns_eps(b.group), restarts=restarts, fro_sumsq=fro, out=out,
                row_sumsq_out=row_sumsq, props=self.props)
        return prepare_newton_schulz(
            x, schedule, b.rule.ns_eps(b.group), fro_sumsq=fro, out=out, row_sumsq_out=row_sumsq,
            props=self.props, overwrite_input=len(schedule) % 2 == 1)

    # The distributed exchange's hooks (trasmuon.distributed.StepExchange) ------------
    exchange_dtype = torch.bfloat16  # what X and O travel as (the kernels' Newton–Schulz dtype)
    row_sums_dtype = torch.float32

    def pack_input(self, i: int, out: Tensor) -> None:
        """This rank's block of matrix ``i``'s Newton–Schulz input into ``out`` (bytes)."""
        block_view(out, torch.bfloat16, tuple(self.x.shape[1:])).copy_(self.x[i])

    def owner_stage(self, count: int) -> TritonOwner:
        """Newton–Schulz of the ``count`` whole matrices this rank owns."""
        return TritonOwner(self, count)

    def unpack_output(self, i: int, data: Tensor) -> None:
        """This rank's block of matrix ``i``'s O (and its rows' sums of squares) from bytes."""
        shape = tuple(self.o.shape[1:])
        self.o[i].copy_(block_view(data, torch.bfloat16, shape))
        if self.row_sumsq is not None:
            self.row_sumsq[i].copy_(row_sums_view(data, torch.bfloat16, shape, torch.float32))

    def outputs_received(self) -> None:
        self.bucket.ortho = self.o

    # The stages ----------------------------------------------------------------------
    def begin(self) -> None:
        self.grad_table.refresh(self.bucket.grads())

    def prepare(self) -> None:
        for launch in self.pass1:
            launch()

    def orthogonalize(self) -> None:
        for launch in self.ns:
            launch()
        self.bucket.ortho = self.o

    def post(self) -> None:
        for launch in self.post_launches:
            launch()

    def finish(self) -> None:
        for launch in self.finish_launches:
            launch()


class TritonOwner:
    """The whole matrices a rank owns in an exchange: bf16 inputs assembled from their blocks,
    Newton–Schulz with O's row sums of squares from its last epilogue (when the rule needs
    them), O's blocks out."""

    def __init__(self, program: TritonMatrixProgram, count: int) -> None:
        b = program.bucket
        self.x = torch.empty(count, *b.shape, dtype=torch.bfloat16, device=b.device)
        self.o = torch.empty_like(self.x)
        self.row_sums = (torch.empty(count, b.shape[0], dtype=torch.float32, device=b.device)
                         if b.rule.needs_row_sumsq else None)
        self.launches = program._ns(self.x, self.o, None, self.row_sums)

    def unpack_input(self, k: int, block: Block, data: Tensor) -> None:
        (r0, r1), (c0, c1) = block.rows, block.cols
        self.x[k, r0:r1, c0:c1].copy_(block_view(data, torch.bfloat16, block.shape))

    def run(self) -> None:
        for launch in self.launches:
            launch()

    def pack_output(self, k: int, block: Block, out: Tensor) -> None:
        (r0, r1), (c0, c1) = block.rows, block.cols
        block_view(out, torch.bfloat16, block.shape).copy_(self.o[k, r0:r1, c0:c1])
        if self.row_sums is not None:
            row_sums_view(out, torch.bfloat16, block.shape, torch.float32).copy_(self.row_sums[k, r0:r1])


class TritonMuon(TritonMatrixProgram):
    """Muon: W <- (1 - lr wd) W - lr * muon_lr_factor * O, lr read on the device."""

    def beta1(self) -> float:
        return self.bucket.group["momentum"]

    def build_rule(self) -> None:
        from trasmuon_kernels.update import StepSize, prepare_update_pass

        b = self.bucket
        g = b.group
        factor = ref.muon_lr(1.0, g["adjust_lr_fn"], *b.shape)
        self.factor = factor
        self.finish_launches = prepare_update_pass(
            self.param_table.bucket, self.o, lr=self.lr, weight_decay=g["weight_decay"],
            row=StepSize(self.lr, factor), props=self.props)

    def diagnostics(self) -> list[dict[str, Any]]:
        step = self.lr * self.factor
        return [{"step_size": step} for _ in self.bucket.params]


class TritonTrasMuon(TritonMatrixProgram):
    """TrasMuon and NorMuon (``gate_on=False``): the momentum pass with the column energies,
    Newton–Schulz with O's row sums, the row-stats kernel, the gate kernel and the update
    kernel (which forms eta_hat from the complete ||O_base||_F^2)."""

    def __init__(self, bucket: Bucket, plan: StepPlan, *, gate_on: bool) -> None:
        super().__init__(bucket, plan)
        self.gate_on = gate_on
        source = bucket.group.get("energy_source", "momentum")
        self.energy_source = source if gate_on and source != "update" else None
        self._first: Tensor | None = None
        self._pending_ref: list[int] = []

    def pass1_energy_out(self) -> Tensor | None:
        return self.bucket.reductions["energy"] if self.energy_source is not None else None

    def build_rule(self) -> None:
        from trasmuon_kernels.momentum_energy import prepare_column_energy
        from trasmuon_kernels.update import EtaFromSumsq, prepare_row_stats, prepare_update_pass

        b = self.bucket
        g = b.group
        d_out, d_in = b.shape
        rows = b.local_rows
        self.row_v = stack_state(b, "row_v", (rows,), 0.0)
        self.rowscale = torch.empty(b.count, rows, dtype=torch.float32, device=b.device)
        base_sumsq = b.reductions["o_base_sumsq"][:, 0]
        post = prepare_row_stats(
            self.row_v, self.row_sumsq, d_in=d_in, beta2=g["betas"][1], eps=g["eps"],
            scale=g["scale"], lr=self.lr, eta_eps=ref.ETA_HAT_EPS, rowscale_out=self.rowscale,
            sumsq_out=base_sumsq, with_eta_hat=False, props=self.props)
        if self.gate_on and g["energy_source"] == "update":
            post += prepare_column_energy(self.o, row_scale=self.rowscale,
                                          out=self.pass1_energy_view(b.reductions["energy"]),
                                          props=self.props)
        self.post_launches = post
        finish = []
        self.gate = None
        if self.gate_on:
            finish += self._gate()
        finish += prepare_update_pass(
            self.param_table.bucket, self.o, lr=self.lr, weight_decay=g["weight_decay"],
            row=EtaFromSumsq(base_sumsq, self.rowscale, ref.eta_hat_scale(g["scale"], d_out, d_in),
                             ref.ETA_HAT_EPS),
            col_gate=None if self.gate is None else self.gate[:, b.cols], props=self.props)
        self.finish_launches = finish

    def _gate(self) -> list[Any]:
        from trasmuon_kernels.gate import prepare_gate_stage

        b = self.bucket
        g = b.group
        d_in = b.shape[1]
        keys = ["c_ema"] + (["sf_c_lr2_sum", "c_last"] if g["schedule_free"] else [])
        fills = {"c_ema": 1.0, "sf_c_lr2_sum": 0.0, "c_last": 1.0}
        state = {k: stack_state(b, k, (d_in,), fills[k]) for k in keys}
        if g["schedule_free"]:
            state["sf_lr2_sum"] = stack_state(b, "sf_lr2_sum", (), 0.0)
        # E_ref is created by a matrix's first gated step: matrices without one get a flag the
        # kernel clears, and their state entry appears once that step has run (``end``).
        self._pending_ref = [i for i, s in enumerate(b.states) if "energy_ref" not in s]
        energy_ref = torch.zeros(b.count, dtype=torch.float32, device=b.device)
        for i, s in enumerate(b.states):
            if "energy_ref" in s:
                energy_ref[i].copy_(s["energy_ref"])
                if isinstance(s, ExpertState):
                    if s.expert == s.experts - 1:
                        bind_rows(s, "energy_ref", energy_ref[i + 1 - s.experts:i + 1])
                else:
                    s["energy_ref"] = energy_ref[i]
        state["energy_ref"] = energy_ref
        self._energy_ref = energy_ref
        self._first = torch.tensor([1 if i in self._pending_ref else 0 for i in range(b.count)],
                                   dtype=torch.uint8).to(b.device)
        self.gate = torch.empty(b.count, d_in, dtype=torch.float32, device=b.device)
        return prepare_gate_stage(
            state, b.reductions["energy"], self.steps, self.lr,
            k=ref.quantile_rank(d_in, g["energy_quantile"]), warmup_steps=g["warmup_steps"],
            clip_period=g["clip_period"], clip_alpha=g["clip_alpha"], clip_min=g["clip_min"],
            clip_trigger=g["clip_trigger"], clip_beta=g["clip_beta"],
            energy_beta=g["energy_beta"], energy_eps=g["energy_eps"],
            schedule_free=g["schedule_free"], sf_mix=g["sf_mix"], sf_eps=ref.SCHEDULE_FREE_EPS,
            first=self._first, out=self.gate, props=self.props)

    def end(self) -> None:
        if self._pending_ref:
            for i in self._pending_ref:
                s = self.bucket.states[i]
                if isinstance(s, ExpertState):  # (a stack's experts start their gate together)
                    if s.expert == s.experts - 1:
                        s.base.pop("energy_ref", None)
                        bind_rows(s, "energy_ref", self._energy_ref[i + 1 - s.experts:i + 1])
                else:
                    s["energy_ref"] = self._energy_ref[i]
            self._pending_ref = []

    def diagnostics(self) -> list[dict[str, Any]]:

        b = self.bucket
        g = b.group
        d_out, d_in = b.shape
        base = b.reductions["o_base_sumsq"][:, 0]
        eta = ref.eta_hat_from_sumsq(g["scale"], self.lr, d_out, d_in, base)
        states = b.rule_states()
        out = []
        for i in range(b.count):
            entry = {"eta_hat": eta[i], "state": states[i],
                     "energy": b.reductions["energy"][i] if self.gate_on else None,
                     "gate": self.gate[i] if self.gate is not None else None}
            out.append(matrix_diagnostics(entry, g, self.gate_on))
        return out

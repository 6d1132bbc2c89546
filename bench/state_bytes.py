"""Bytes of optimizer state per parameter, per class, for a model's parameter structure.

    python bench/state_bytes.py --json bench/results/state_bytes.json

With ``state_dtype=torch.bfloat16`` (the ``*_bf16_state`` rows) the matrix rules keep their
momentum in bf16 (stochastic rounding) and everything else in float32; AdamW is unchanged.

The state is what ``optimizer.state`` holds (``state_dict``'s tensors), from each rule's own
table of state entries (``trasmuon.plan.state_shapes``) for the matrices (the class's matrix
rule) and the other params (AdamW), params bf16, state float32 (``reference.state_dtype``).
The step counter is left out (one scalar per tensor). The first model is also built and
stepped once on the CPU, and the bytes actually allocated (``bench/common.py``'s
``state_bytes``) must equal the table's: a check that the table is what the optimizer keeps.
Buffers a Triton plan keeps beside the state (Newton-Schulz inputs and outputs, sums over
rows) are not state and are not counted.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import OURS, make_params, make_step, state_bytes  # noqa: E402
from bench.shapes import MODELS  # noqa: E402
from bench.timing import write_json  # noqa: E402
from trasmuon import reference as ref  # noqa: E402
from trasmuon.plan import state_entries_for, state_shapes  # noqa: E402
from trasmuon.rules import get_rule  # noqa: E402

STATE_DTYPE_BYTES = torch.finfo(ref.state_dtype(torch.bfloat16)).bits // 8
# The classes whose matrix rule can keep bf16 momentum (state_dtype=torch.bfloat16).
BF16_STATE = ("trasmuon", "normuon", "muon", "namo", "namo_d")


def table_bytes(cls: type, specs, matrices_only: bool = False,
                state_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(state bytes, params) of ``cls`` for ``specs`` (or for its matrices only) from the
    rules' state tables; ``state_dtype``: the matrix rule's group key (its ``compact``
    entries, the momentum, in that dtype)."""
    matrix_rule = get_rule(cls.matrix_rule)
    adamw = get_rule("adamw")
    total = params = 0
    for shape, count, kind in specs:
        if matrices_only and kind != "matrix":
            continue
        rule = matrix_rule if kind == "matrix" else adamw
        group = dict(rule.defaults)
        if kind == "matrix" and state_dtype is not None:
            group["state_dtype"] = state_dtype
        shapes = state_shapes(rule, group, tuple(shape))
        compact = {e.name for e in state_entries_for(rule, group, tuple(shape)) if e.compact}
        for name, s in shapes.items():
            if name == "step":
                continue
            nbytes = (torch.finfo(state_dtype).bits // 8 if name in compact and state_dtype is not None
                      else STATE_DTYPE_BYTES)
            total += count * math.prod(s) * nbytes
        params += count * math.prod(shape)
    return total, params


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2-small,llama3.2-1b")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    models = args.models.split(",")
    result: dict = {"param_dtype": "bfloat16", "state_dtype": "float32", "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d"), "bytes_per_param": {},
                    "bytes_per_matrix_param": {}}
    for model in models:
        for key, only in (("bytes_per_param", False), ("bytes_per_matrix_param", True)):
            row = {}
            for name, cls in OURS.items():
                nbytes, params = table_bytes(cls, MODELS[model], only)
                row[name] = nbytes / params
            result[key][model] = row
            print(model, key, {k: round(v, 3) for k, v in row.items()})
        for key, only in (("bytes_per_param_bf16_state", False),
                          ("bytes_per_matrix_param_bf16_state", True)):
            row = {}
            for name in BF16_STATE:
                nbytes, params = table_bytes(OURS[name], MODELS[model], only, torch.bfloat16)
                row[name] = nbytes / params
            result.setdefault(key, {})[model] = row
            print(model, key, {k: round(v, 3) for k, v in row.items()})
    # The check: what a built and stepped optimizer allocates (the first model, eager backend).
    checked = {}
    for name in OURS:
        matrices, others = make_params(MODELS[models[0]], "cpu", torch.bfloat16)
        step, opts = make_step(name, matrices, others)
        step()
        counters = sum(1 for opt in opts for s in opt.state.values() if "step" in s)
        allocated = state_bytes(opts) - counters * 4  # (each step counter: one float32)
        checked[name] = allocated == table_bytes(OURS[name], MODELS[models[0]])[0]
        del matrices, others, opts, step
    result["allocated_equals_table"] = checked
    print("allocated == table:", checked)
    checked = {}
    for name in BF16_STATE:  # the same with bf16 momentum
        matrices, others = make_params(MODELS[models[0]], "cpu", torch.bfloat16)
        opt = OURS[name]([{"params": matrices}, {"params": others, "rule": "adamw"}], lr=1e-3,
                         backend="eager", state_dtype=torch.bfloat16, seed=0)
        opt.step()
        counters = sum(1 for s in opt.state.values() if "step" in s)
        allocated = state_bytes([opt]) - counters * 4
        checked[name] = allocated == table_bytes(OURS[name], MODELS[models[0]], False, torch.bfloat16)[0]
        del matrices, others, opt
    result["allocated_equals_table_bf16_state"] = checked
    print("allocated == table (bf16 state):", checked)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()

"""Run the authors' TrasMuon (PyPI ``trasmuon-pytorch``) on a recorded gradient sequence.

Runs inside the authors' own virtual environment (their import name is also ``trasmuon``),
started as a subprocess by ``compare_authors.py``. Reads ``{"w0": [...], "grads": [[...]],
"lrs": [...], "kwargs": {...}}`` from a ``torch.save`` file and writes the weights and the
gate state after every step.
"""

import sys

import torch

import trasmuon.optimizer as authors  # the authors' package, in its own venv
from trasmuon import TrasMuon


def float64_newton_schulz(G, *, ns_iters, eps, use_triton):
    """Step 3 of docs/rule.md in float64 with the authors' coefficients: lets the comparison isolate
    everything but Newton-Schulz's bf16 rounding (``--ns float64``)."""
    x = G.double()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm() + eps)
    for a, b, c in authors._NS_CONSTS[:ns_iters]:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def main(inp: str, out: str) -> None:
    job = torch.load(inp, weights_only=True)
    if job["ns"] == "float64":
        authors._ns_orthogonalize_fp32 = float64_newton_schulz
    params = [torch.nn.Parameter(w.clone()) for w in job["w0"]]
    opt = TrasMuon(params, lr=job["lrs"][0], use_triton=False, **job["kwargs"])
    trace = {"w": [], "c": [], "c_ema": [], "e_ref": [], "v": []}
    for lr, grads in zip(job["lrs"], job["grads"], strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        trace["w"].append([p.detach().clone() for p in params])
        trace["c"].append([opt.state[p]["c_last"].clone() for p in params])
        trace["c_ema"].append([opt.state[p]["c_ema"].clone() for p in params])
        trace["e_ref"].append([opt.state[p]["E_ref_ema"].clone() for p in params])
        trace["v"].append([opt.state[p]["v_row"].clone() for p in params])
    torch.save(trace, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

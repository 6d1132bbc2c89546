"""An independent float64 transcription of the TrasMuon rule (docs/rule.md) in NumPy, for tests only.

It is written from the rule's statement line by line (not from trasmuon.reference) so that the
optimizer can be checked against a second reading of the spec; it is slow and plain on
purpose. Newton-Schulz runs in float64 here, so compare with ``ns_dtype=torch.float64``.
"""

from __future__ import annotations

import math

import numpy as np


def newton_schulz(m: np.ndarray, schedule, eps: float) -> np.ndarray:
    """Newton-Schulz of one matrix in float64: X = M / (||M||_F + eps) on the wide side
    (M^T when M is tall), then per (a, b, c) of ``schedule`` X <- a X + (b A + c A A) X with
    A = X X^T; transposed back."""
    tall = m.shape[0] > m.shape[1]
    x = m.T.copy() if tall else m.copy()
    x = x / (np.linalg.norm(x) + eps)
    for a, b, c in schedule:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class SpecTrasMuon:
    """One matrix, steps 1-12 of docs/rule.md, float64 throughout."""

    def __init__(self, w: np.ndarray, **hp):
        self.w = np.array(w, dtype=np.float64)
        self.hp = dict(
            betas=(0.95, 0.95), eps=1e-8, weight_decay=0.0, nesterov=False,
            schedule=(
                (4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377),
                (3.7418, -5.5913, 2.3037), (2.8769, -3.1427, 1.2046),
                (2.8366, -3.0525, 1.2012),
            ),
            scale=0.2, clip=True, clip_alpha=1.0, clip_min=0.7, clip_trigger=3.0,
            clip_period=4, clip_min_cols=8, clip_beta=0.9, energy_beta=0.99,
            energy_quantile=0.5, energy_eps=1e-12, energy_source="momentum",
            warmup_steps=0, schedule_free=True, sf_mix=0.3,
        )
        self.hp.update(hp)
        d_out, d_in = self.w.shape
        self.t = 0
        self.m = np.zeros_like(self.w)
        self.v = np.zeros(d_out)
        self.e_ref = None
        self.c_ema = np.ones(d_in)
        self.s = 0.0
        self.c_sum = np.zeros(d_in)
        self.c_last = np.ones(d_in)
        self.applied = np.ones(d_in)

    def step(self, g: np.ndarray, lr: float) -> None:
        hp = self.hp
        b1, b2 = hp["betas"]
        eps = hp["eps"]
        self.t += 1
        t = self.t
        d_out, d_in = self.w.shape
        self.w = (1 - lr * hp["weight_decay"]) * self.w  # 1
        self.m = b1 * self.m + (1 - b1) * g  # 2
        ns_in = (1 - b1) * g + b1 * self.m if hp["nesterov"] else self.m
        o = newton_schulz(ns_in, hp["schedule"], eps)  # 3
        self.v = b2 * self.v + (1 - b2) * (o**2).mean(axis=1)  # 4
        o_base = o / (np.sqrt(self.v) + eps)[:, None]  # 5
        eta = hp["scale"] * lr * math.sqrt(d_out * d_in) / (np.linalg.norm(o_base) + 1e-12)  # 6
        gate_on = hp["clip"] and d_in >= hp["clip_min_cols"]
        c = np.ones(d_in)
        if gate_on:
            src = {"momentum": self.m, "grad": g, "update": o_base}[hp["energy_source"]]
            energy = (src**2).sum(axis=0)  # 7
            k = min(max(math.floor(hp["energy_quantile"] * d_in + 0.5), 1), d_in)
            e_cur = np.sort(energy)[k - 1]  # 8
            if self.e_ref is None:
                self.e_ref = e_cur
            else:
                self.e_ref = hp["energy_beta"] * self.e_ref + (1 - hp["energy_beta"]) * e_cur
            post = t > hp["warmup_steps"]
            if hp["schedule_free"] and post:  # 9
                self.s += lr**2
                self.c_sum += lr**2 * self.c_last
            c_avg = self.c_sum / (self.s + 1e-12) if self.s > 0 else np.ones(d_in)
            if post and (t % hp["clip_period"] == 0 or t == 1):  # 10
                r = energy / (self.e_ref + hp["energy_eps"])
                cj = np.clip(1 / (1 + hp["clip_alpha"] * np.log(1 + r)), hp["clip_min"], 1)
                if hp["clip_trigger"] is not None:
                    cj = np.where(r <= hp["clip_trigger"], 1.0, cj)
                self.c_ema = hp["clip_beta"] * self.c_ema + (1 - hp["clip_beta"]) * cj
            if post:  # 11
                mix = hp["sf_mix"]
                c = (1 - mix) * self.c_ema + mix * c_avg if hp["schedule_free"] else self.c_ema.copy()
            self.c_last = c
        self.applied = c
        self.w = self.w - eta * o_base * c[None, :]  # 12

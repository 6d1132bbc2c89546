"""An independent float64 transcription of NAMO and NAMO-D (docs/rule.md, "NAMO and NAMO-D")
in NumPy, for tests only: written from the rule's statement, not from trasmuon.reference.
Newton-Schulz runs in float64 here, so compare with ``ns_dtype=torch.float64``."""

from __future__ import annotations

import math

import numpy as np

from .spec_oracle import newton_schulz

MUON_TRIPLE = (3.4445, -4.7750, 2.0315)


class OracleNAMO:
    """One matrix W (m x n). ``clamp=None`` is NAMO; a float is NAMO-D with that clamp."""

    def __init__(self, w: np.ndarray, *, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.1,
                 nesterov=True, scale=0.2, weight_decay_mode="adaptive", clamp=None, ns_steps=5):
        self.w = np.array(w, dtype=np.float64)
        self.b1, self.b2 = betas
        self.eps, self.wd, self.nesterov, self.scale = eps, weight_decay, nesterov, scale
        self.mode, self.clamp, self.ns_steps = weight_decay_mode, clamp, ns_steps
        m, n = self.w.shape
        self.t = 0
        self.mom = np.zeros((m, n))
        self.v = 0.0 if clamp is None else np.zeros(n)
        self.last = {}

    def step(self, g: np.ndarray, lr: float) -> None:
        g = np.asarray(g, dtype=np.float64)
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        m, n = self.w.shape
        # 1. second moment of the raw gradient
        if self.clamp is None:
            self.v = b2 * self.v + (1 - b2) * float(np.sum(g * g))
        else:
            self.v = b2 * self.v + (1 - b2) * np.sum(g * g, axis=0)
        # 2. momentum and the Nesterov input
        self.mom = b1 * self.mom + (1 - b1) * g
        big_n = (1 - b1) * g + b1 * self.mom if self.nesterov else self.mom
        # 3. orthogonalize
        o = newton_schulz(big_n, (MUON_TRIPLE,) * self.ns_steps, 1e-7)
        # 4. bias-corrected base step and the shape factor
        base = lr * math.sqrt(1 - b2**t) / (1 - b1**t + 1e-12)
        shape = self.scale * math.sqrt(max(m, n))
        # 5. step sizes
        if self.clamp is None:
            alpha = base * np.linalg.norm(big_n) / (math.sqrt(self.v) + self.eps)
            step_wd, step_up = min(alpha, 1.0), min(alpha * shape, 1.0)
            self.last = {"alpha": alpha, "step_up": step_up}
        else:
            d = np.sqrt(np.sum(big_n * big_n, axis=0)) / (np.sqrt(self.v) + self.eps)
            mean = float(np.mean(d))
            if 0 < self.clamp <= 1 and math.isfinite(mean) and mean > 0:
                d = np.clip(d, self.clamp * mean, mean / self.clamp)
            step_wd, step_up = np.minimum(base * d, 1.0), np.minimum(base * shape * d, 1.0)
            self.last = {"d": d, "step_up": step_up}
        # 6. weight decay, 7. the update
        if self.mode == "adaptive":
            factor = np.maximum(1.0 - self.wd * step_wd, 0.0)
        else:
            factor = 1.0 - lr * self.wd
        self.w = self.w * factor - o * step_up

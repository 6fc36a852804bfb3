"""An independent, deliberately plain re-implementation of MABN from ``docs/algorithm.md`` (sections 4-7).

One normalization batch at a time, Python lists for the windows, no vectorization and nothing
imported from ``mabn``: the oracle the tests hold the package's layers against.
"""
from __future__ import annotations

import torch


class LoopMABN:
    def __init__(self, channels, window, norm_batch_size, eps, momentum, warmup_iters, renorm_warmup_iters, r_max, warmup):
        self.m = window
        self.b = norm_batch_size
        self.eps = eps
        self.alpha = momentum
        self.warmup_iters = warmup_iters
        self.renorm_warmup_iters = renorm_warmup_iters
        self.r_max = r_max
        self.warmup = warmup
        self.t = 0  # training steps
        self.n = 0  # normalization batches
        self.nu = torch.ones(channels, dtype=torch.float64)
        seed_chi2 = 1.0 if warmup == "classification" else 0.0
        self.chi2_history = [torch.full((channels,), seed_chi2, dtype=torch.float64) for _ in range(window)]
        self.psi_history = [torch.zeros(channels, dtype=torch.float64) for _ in range(window)]

    @staticmethod
    def _channel_mean(t):
        return t.mean(dim=(0, 2, 3))

    def _window_mean(self, history):
        return torch.stack(history[-self.m:]).mean(0)

    def step(self, x, dy, gamma, beta):
        """One training forward and its backward. Returns (y, dx, dgamma, dbeta)."""
        self.t += 1
        b = self.b or x.shape[0]
        view = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
        nu_at_step_start = self.nu.clone()
        ys, saved, chi2_bars = [], [], []
        for start in range(0, x.shape[0], b):
            xj = x[start:start + b]
            self.n += 1
            chi2 = self._channel_mean(xj * xj)
            self.chi2_history.append(chi2)
            if self.warmup == "formal":
                use_sma = self.n > self.m and self.t >= self.warmup_iters
            else:
                use_sma = self.t >= self.warmup_iters
            chi2_bar = self._window_mean(self.chi2_history) if use_sma else chi2
            s = torch.sqrt(chi2_bar + self.eps)
            z = xj / view(s)
            nu = self.nu if self.warmup == "formal" else nu_at_step_start
            if self.t <= self.renorm_warmup_iters:
                r = torch.ones_like(s)
            else:
                r = torch.clamp(s / torch.sqrt(nu + self.eps), 1 / self.r_max, self.r_max)
            ys.append(view(gamma) * view(r) * z + view(beta))
            if self.warmup == "formal":
                self.nu = self.alpha * self.nu + (1 - self.alpha) * chi2_bar
            chi2_bars.append(chi2_bar)
            saved.append((z, s, r, use_sma))
        if self.warmup == "classification":
            step_mean = torch.stack(chi2_bars).mean(0)
            if self.t == 1:
                self.nu = step_mean
            self.nu = self.alpha * self.nu + (1 - self.alpha) * step_mean

        dxs = []
        dgamma = torch.zeros_like(gamma)
        dbeta = torch.zeros_like(beta)
        for j, (z, s, r, use_sma) in enumerate(saved):
            dyj = dy[j * b:(j + 1) * b]
            g = view(gamma) * view(r) * dyj
            psi = self._channel_mean(g * z)
            self.psi_history.append(psi)
            psi_bar = self._window_mean(self.psi_history) if use_sma else psi
            dxs.append((g - z * view(psi_bar)) / view(s))
            dgamma += (dyj * view(r) * z).sum(dim=(0, 2, 3))
            dbeta += dyj.sum(dim=(0, 2, 3))
        return torch.cat(ys), torch.cat(dxs), dgamma, dbeta

    def buffers(self):
        return {
            "num_steps": self.t,
            "num_norm_batches": self.n,
            "running_var": self.nu,
            "window_var": torch.stack(self.chi2_history[-self.m:]),
            "window_psi": torch.stack(self.psi_history[-self.m:]),
        }

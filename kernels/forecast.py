"""Carrying a row's last full prediction along its recent trend (CAT and the detail cache).

Predicted noise changes smoothly, so a damped first-order step beats holding it (as TaylorSeer,
arXiv 2503.06923). The first full step starts no slope (at pure noise the prediction is roughly the
mean image), and a row holds while its trend predicts worse than holding (e.g. SDE samplers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def along_trend(noise: torch.Tensor, from_sigma: float, sigma: float, slope: torch.Tensor,
                damping: float) -> torch.Tensor:
    """`noise` (predicted at `from_sigma`) moved to `sigma` along `slope` (d noise / d sigma), damped."""
    return noise + (damping * (sigma - from_sigma)) * slope


@dataclass
class Trend:
    """A row's last full prediction, its sigma, and the slope between the last two."""

    full: torch.Tensor | None = None
    sigma: float | None = None
    steps: int = 0                       # full steps seen
    slope: torch.Tensor | None = None    # d noise / d sigma
    ok: object = True                    # True, or a 0-d bool tensor (kept on the device: no sync)

    def record(self, noise: torch.Tensor, sigma: float, damping: float):
        """Record a full step; another call at the same sigma (cond, uncond apart) only replaces it."""
        if self.sigma != sigma:
            if self.slope is not None:  # did the trend beat holding at this step?
                guess = along_trend(self.full, self.sigma, sigma, self.slope, damping)
                self.ok = (guess - noise).norm() < (self.full - noise).norm()
            if self.steps >= 2:
                self.slope = (noise - self.full) / (sigma - self.sigma)
            self.steps += 1
        self.full, self.sigma = noise, sigma

    def carry(self, noise: torch.Tensor, from_sigma: float, sigma: float, damping: float) -> torch.Tensor:
        """`noise` (predicted at `from_sigma`) carried to `sigma` while the trend holds, else held."""
        if self.slope is None or self.ok is False or damping == 0.0:
            return noise
        moved = along_trend(noise, from_sigma, sigma, self.slope, damping)
        return moved if self.ok is True else torch.where(self.ok, moved, noise)

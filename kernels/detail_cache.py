"""Detail cache for the merging methods (SDTM, density): merged calls lean on the last full call.

A merged call's per-token detail is wrong (a group shares one update), and even its coarse part is
farther off than F, the last full call's noise carried along its trend (forecast.Trend, damped by
`forecast`). So it only corrects F: noise = F + detail_weight * LowPass(merged - F), and a full step
follows every `refresh_every` merged steps. Why these defaults: docs/sdtm.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .forecast import Trend
from .method_spec import Setting
from .runtime import StepCounter, call_rows, check_fractions


@dataclass
class DetailRunState:
    """Per batch-row key, the full calls' Trend for one sampling run; `clear()` frees it."""

    rows: dict = field(default_factory=dict)
    peak_cache_bytes: int = 0
    steps: StepCounter = field(default_factory=StepCounter)

    def clear(self):
        self.rows.clear()
        self.steps = StepCounter()


def low_pass(d: torch.Tensor, pool: int) -> torch.Tensor:
    """Average over pool x pool windows of the last two axes, bilinear back to full size (per frame)."""
    shape = d.shape
    flat = d.movedim(1, 2).reshape(-1, shape[1], *shape[-2:]) if d.ndim == 5 else d
    coarse = F.avg_pool2d(flat.float(), pool, ceil_mode=True)
    up = F.interpolate(coarse, size=shape[-2:], mode="bilinear", align_corners=False).to(d.dtype)
    if d.ndim == 5:
        up = up.reshape(shape[0], shape[2], shape[1], *shape[-2:]).movedim(2, 1)
    return up


class DetailCache:
    def __init__(self, window: int, weight: float = 1.0, refresh_every: int = 0, forecast: float = 0.0):
        self.window, self.weight = int(window), float(weight)
        self.refresh_every, self.forecast = int(refresh_every), float(forecast)

    @classmethod
    def of(cls, config, window: int) -> "DetailCache | None":
        """The cache a merging method's config asks for (None when switched off)."""
        if not config.detail_cache:
            return None
        return cls(window, config.detail_weight, config.refresh_every, config.forecast)

    def new_run_state(self) -> DetailRunState:
        return DetailRunState()

    def wants_full_call(self, state: DetailRunState, call, x: torch.Tensor) -> bool:
        """A full call when a refresh is due or a row has nothing cached; rising sigma is a new run."""
        sigma = float(call.sigma)
        if state.steps.starts_new_run(sigma):
            state.clear()
        state.steps.count(sigma)
        return self.refresh_every > 0 and (state.steps.reduced_since_full >= self.refresh_every
                                           or any(k not in state.rows for k in call_rows(call, x.shape[0])))

    def serves(self, state: DetailRunState, call, x: torch.Tensor) -> bool:
        """A reduced call needs no model at all: its merged output would be ignored (weight 0) and every row's
        forecast is at hand for this latent."""
        if self.weight:
            return False
        rows = [state.rows.get(k) for k in call_rows(call, x.shape[0])]
        return all(r is not None and r.full.shape == x.shape[1:] and r.full.device == x.device for r in rows)

    def end_call(self, state: DetailRunState, call, reduced: bool, noise: torch.Tensor):
        """(corrected forecast, all-False computed mask) for a reduced call; records full calls, returns None."""
        if noise.ndim not in (4, 5):
            return None
        keys = call_rows(call, noise.shape[0])
        sigma = float(call.sigma)
        state.steps.last_full = not reduced
        if not reduced:
            for key, row_noise in zip(keys, noise.detach().float().unbind(0)):
                trend = state.rows.get(key)
                if trend is None or trend.full.shape != row_noise.shape or trend.full.device != row_noise.device:
                    trend = state.rows[key] = Trend()
                trend.record(row_noise.clone(), sigma, self.forecast)
            state.peak_cache_bytes = max(state.peak_cache_bytes, sum(
                t.numel() * t.element_size() for r in state.rows.values() for t in (r.full, r.slope) if t is not None))
            return None
        cached = [state.rows.get(key) for key in keys]
        if any(c is None or c.full.shape != noise.shape[1:] or c.full.device != noise.device for c in cached):
            return None
        ref = torch.stack([c.carry(c.full, c.sigma, sigma, self.forecast) for c in cached]).to(noise.dtype)
        blended = ref + self.weight * low_pass(noise - ref, self.window * int(call.patch)) if self.weight else ref
        return blended, torch.zeros((1,) * noise.ndim, dtype=torch.bool, device=noise.device)


# The presets of both merging nodes ("balanced": their defaults): their fidelity comes from the refresh
# schedule, so the presets move it. Measured in docs/evidence.md.
MERGING_PRESETS = {
    "quality": dict(refresh_every=1),
    "balanced": {},
    "fast": dict(start_percent=0.2, detail_weight=0.2),
}


@dataclass(frozen=True)
class DetailSettings:
    """The detail-cache fields of both merging methods' configs (they inherit them)."""

    detail_cache: bool = True
    refresh_every: int = 2
    forecast: float = 0.5
    detail_weight: float = 0.1

    def check_detail_settings(self, label: str):
        if self.refresh_every < 0:
            raise ValueError(f"{label}: refresh_every must be >= 0, got {self.refresh_every}")
        check_fractions(label, self, "forecast", "detail_weight")


def detail_settings(verb: str) -> tuple:
    """The merging nodes' detail-cache inputs; `verb` is "merged" or "pooled"."""
    return (Setting("detail_cache", f"A {verb} step only corrects the last full step's prediction carried along its "
                                    f"trend (off: each {verb} step stands alone, and per-token noise shows)."),
            Setting("refresh_every", f"With the detail cache: one full step after this many {verb} steps (0 = "
                                     "never).", 0, 100),
            Setting("forecast", "With the detail cache: how far the last full prediction follows its recent trend "
                                "(0 = held).", 0.0, 1.0, 0.05),
            Setting("detail_weight", f"With the detail cache: how much of its own coarse difference a {verb} step "
                                     "adds.", 0.0, 1.0, 0.05))

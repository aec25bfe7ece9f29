"""Plain step caches on the reference model: the simple alternative a preset must beat at equal work.

At each sampling step either the full model runs, or every batch row's last full output is carried along
its trend, with no token-level work:
- order 1: the pack's own forecast (kernels.forecast.Trend: damped slope between the last two full steps,
  held while the trend predicts worse than holding);
- order 2: a second-order forecast in the spirit of TaylorSeer (arXiv 2503.06923): the polynomial through
  the last three full outputs (Newton divided differences in sigma), each order damped.
The run's first full step starts no trend (at pure noise the prediction is roughly the mean image).

Layouts: a warm-up of `warmup` full steps, then one full step every `every` steps. A skipped step calls no
model, so a layout costs its full steps over all steps (FLOPs counted by the sampler's FlopCounterMode).
"""
from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernels.forecast import Trend  # noqa: E402
from kernels.methods import BY_KEY  # noqa: E402
from tools import reference_dit as R  # noqa: E402

EVERY = range(2, 7)      # the layouts every comparison lists: these refresh intervals, and warm-ups(steps)


def warmups(steps: int) -> range:
    """Warm-ups from 2 up to half the run (at least 10): every preset's own warm-up (a share of the run) has
    caches of its length to meet, at 50 steps as at 28."""
    return range(2, max(10, steps // 2) + 1)


@dataclass(frozen=True)
class Layout:
    """Full steps: the first `warmup`, then the last of every `every` steps after them."""

    warmup: int
    every: int

    def is_full(self, step: int) -> bool:
        return step < self.warmup or (step - self.warmup + 1) % self.every == 0

    def full_steps(self, steps: int) -> int:
        return sum(self.is_full(i) for i in range(steps))

    @property
    def name(self) -> str:
        return f"warm-up {self.warmup}, every {self.every}"


def at_most(points, flops: float) -> dict | None:
    """The caches no dearer than `flops`, from `points` (FLOPs share, PSNR dB, layout name): their median PSNR,
    the best one and its layout, and how many (None: none is that cheap). The bar of issue 22 compares here."""
    fit = [p for p in points if p[0] <= flops + 1e-9]
    if not fit:
        return None
    best = max(fit, key=lambda p: p[1])
    return {"median": statistics.median(p[1] for p in fit), "best": best[1], "best_layout": best[2],
            "layouts": len(fit)}


def layouts(steps: int, every=EVERY) -> list[Layout]:
    """Every layout with a warm-up shorter than the run; of layouts with the same full steps (short runs) the
    first only, so that none counts twice in a median."""
    seen, out = set(), []
    for layout in (Layout(w, r) for w in warmups(steps) for r in every if w < steps):
        mask = tuple(layout.is_full(i) for i in range(steps))
        if mask not in seen:
            seen.add(mask)
            out.append(layout)
    return out


class FirstOrder:
    """One row's first-order forecast: the pack's own trend (kernels.forecast.Trend), damped by `damping`."""

    def __init__(self, damping: float):
        self.trend, self.damping = Trend(), damping

    def record(self, out: torch.Tensor, sigma: float):
        self.trend.record(out, sigma, self.damping)

    def carry(self, sigma: float) -> torch.Tensor:
        return self.trend.carry(self.trend.full, self.trend.sigma, sigma, self.damping)


class Taylor:
    """One row's second-order forecast: the polynomial through its last three full outputs, each order
    damped (`damping[k]` scales the k+1-th divided difference); lower orders until three are seen."""

    def __init__(self, damping: tuple):
        self.damping = tuple(damping)
        self.points: list = []   # (sigma, output), newest last; the run's first full step excluded
        self.first: tuple | None = None

    def record(self, out: torch.Tensor, sigma: float):
        if self.first is None:
            self.first = (sigma, out)
            return
        self.points = (self.points + [(sigma, out)])[-(len(self.damping) + 1):]

    def carry(self, sigma: float) -> torch.Tensor:
        points = self.points or [self.first]
        sig = [p[0] for p in reversed(points)]         # newest first
        diff = [p[1] for p in reversed(points)]
        for j in range(1, len(sig)):                    # divided differences in place
            for i in range(len(sig) - 1, j - 1, -1):
                diff[i] = (diff[i - 1] - diff[i]) / (sig[i - j] - sig[i])
        out, basis = diff[0], 1.0
        for j in range(1, len(sig)):
            basis = basis * (sigma - sig[j - 1])
            out = out + (self.damping[j - 1] * basis) * diff[j]
        return out


class StepCache:
    """One sampling run's step cache: a reference_dit.MODEL_WRAPPERS_KEY wrapper (fresh per run)."""

    def __init__(self, layout: Layout, forecast: float = 0.5, order: int = 1):
        if order not in (1, 2):
            raise ValueError(f"step cache: order must be 1 or 2, got {order}")
        self.layout, self.forecast, self.order = layout, float(forecast), order
        self.step, self.sigma = -1, None
        self.rows: list = []

    def options(self, base: dict | None = None) -> dict:
        to = dict(base or {})
        to[R.MODEL_WRAPPERS_KEY] = [self] + list(to.get(R.MODEL_WRAPPERS_KEY, []))
        return to

    def __call__(self, call_next, x, sigma, class_ids, options):
        sigma = float(sigma)
        if sigma != self.sigma:
            self.step, self.sigma = self.step + 1, sigma
        if self.layout.is_full(self.step) or len(self.rows) != x.shape[0]:
            out = call_next(x, sigma, class_ids, options)
            self._record(out, sigma)
            return out
        return self.skipped(call_next, x, sigma, class_ids, options)

    def skipped(self, call_next, x, sigma: float, class_ids, options) -> torch.Tensor:
        """A skipped step's output: every row's forecast (no model call)."""
        return self.forecast_at(sigma).to(x.dtype)

    def forecast_at(self, sigma: float) -> torch.Tensor:
        """Every row's last full output carried to `sigma` (float32)."""
        return torch.stack([row.carry(sigma) for row in self.rows])

    def _record(self, out: torch.Tensor, sigma: float):
        if len(self.rows) != out.shape[0]:
            self.rows = [FirstOrder(self.forecast) if self.order == 1 else Taylor((self.forecast,) * 2)
                         for _ in range(out.shape[0])]
        for row, o in zip(self.rows, out.detach().float().unbind(0)):
            row.record(o, sigma)


class SharedWarmup:
    """A wrapper inside a cache that replays the model calls of an unpatched run it has recorded: every layout's
    warm-up makes the same calls on the same inputs, so a table of layouts computes them once. Exact: a call is
    replayed only when its sigma, classes and input equal a recorded call's bit for bit."""

    def __init__(self):
        self.calls: dict = {}   # sigma -> [(class ids, input, output)]
        self.recording = True

    def __call__(self, call_next, x, sigma, class_ids, options):
        for ids, seen, out in self.calls.get(float(sigma), ()):
            if torch.equal(ids, class_ids) and torch.equal(seen, x):
                return out.clone()
        out = call_next(x, sigma, class_ids, options)
        if self.recording:
            self.calls.setdefault(float(sigma), []).append((class_ids.clone(), x.clone(), out.clone()))
        return out

    def options(self) -> dict:
        return {R.MODEL_WRAPPERS_KEY: [self]}


def through_the_runtime():
    """The plain step cache as the pack's own runtime runs it: CAT at ratio 1 computes no token between its
    full steps (CAT balanced's) and carries the last full output along its trend (skipped steps)."""
    return BY_KEY["cat"].with_settings(dict(ratio=1.0))


def cache_options(layout: Layout, forecast: float = 0.5, order: int = 1, replay: SharedWarmup | None = None):
    """A Row.build-style factory: model -> transformer_options of a fresh step cache (its full calls served by
    `replay` where it has them)."""
    return lambda model: StepCache(layout, forecast, order).options(replay.options() if replay else None)

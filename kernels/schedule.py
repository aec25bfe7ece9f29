"""Progress through denoising, and the per-layer x per-progress ratio schedule.

Progress p in [0, 1] is ComfyUI's "percent" (0 at the noisiest sigma of a full schedule, 1 at sigma 0),
read from sigma through the model's model_sampling, never from a step counter: any sampler, step count
and denoise < 1 see the same stage boundaries.
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from typing import Callable

import torch


class ProgressMap:
    """sigma -> percent, by inverting a monotone `percent_to_sigma` once; plain floats, so a lookup
    dispatches no tensor op."""

    def __init__(self, percent_to_sigma: Callable[[float], float], points: int = 1001):
        percents = [i / (points - 1) for i in range(points)]
        sigmas = [float(percent_to_sigma(p)) for p in percents]
        # ascending sigmas for bisect
        self._sigmas = sigmas[::-1]
        self._percents = percents[::-1]

    def __call__(self, sigma) -> float:
        s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        sig, pct = self._sigmas, self._percents
        if s <= sig[0]:
            return float(pct[0])
        if s >= sig[-1]:
            return float(pct[-1])
        j = bisect.bisect_left(sig, s)
        s0, s1 = sig[j - 1], sig[j]
        w = 0.0 if s1 == s0 else (s - s0) / (s1 - s0)
        return float(pct[j - 1] + w * (pct[j] - pct[j - 1]))


def flow_percent_to_sigma(percent: float) -> float:
    """Unshifted rectified-flow schedule (sigma = 1 - percent): the embedded model's."""
    return min(max(1.0 - percent, 0.0), 1.0)


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    return ys[-1]


@dataclass
class TokenRatioSchedule:
    """Fraction of image tokens removed, per depth and progress: ratios[i][j] at depth[i], progress[j];
    bilinear between, clamped outside. Depth is block / (blocks - 1), so one schedule fits any model."""

    depth: list[float] = field(default_factory=lambda: [0.0, 1.0])
    progress: list[float] = field(default_factory=lambda: [0.0, 1.0])
    ratios: list[list[float]] = field(default_factory=lambda: [[0.0, 0.0], [0.0, 0.0]])
    name: str = "custom"

    def __post_init__(self):
        self.validate()

    def validate(self):
        for axis, pts in (("depth", self.depth), ("progress", self.progress)):
            if not pts or any(not (0.0 <= p <= 1.0) for p in pts) or any(b <= a for a, b in zip(pts, pts[1:])):
                raise ValueError(f"schedule {axis} points must be strictly increasing values in [0, 1], got {pts}")
        if len(self.ratios) != len(self.depth) or any(len(r) != len(self.progress) for r in self.ratios):
            raise ValueError(
                f"schedule ratios must be a {len(self.depth)} x {len(self.progress)} table (depth x progress)")
        for row in self.ratios:
            for r in row:
                if not (0.0 <= r < 1.0) or math.isnan(r):
                    raise ValueError(f"schedule ratios must lie in [0, 1), got {r}")

    def varies_with_progress(self) -> bool:
        """True when some depth's ratio changes from one progress point to another."""
        return any(len(set(row)) > 1 for row in self.ratios)

    def ratio(self, depth: float, progress: float) -> float:
        per_depth = [_interp(self.progress, row, progress) for row in self.ratios]
        return _interp(self.depth, per_depth, depth)

    def to_json(self, indent: int | None = None) -> str:
        """JSON text; with `indent`, one table row per line (readable, for saving and sharing)."""
        d = {"name": self.name, "depth": self.depth, "progress": self.progress, "ratios": self.ratios}
        if indent is None:
            return json.dumps(d)
        pad = " " * indent
        rows = (",\n" + pad * 2).join(json.dumps(row) for row in self.ratios)
        return ("{\n" + pad + f'"name": {json.dumps(self.name)},\n'
                + pad + f'"depth": {json.dumps(self.depth)},\n'
                + pad + f'"progress": {json.dumps(self.progress)},\n'
                + pad + '"ratios": [\n' + pad * 2 + rows + "\n" + pad + "]\n}")

    @classmethod
    def from_json(cls, text: str) -> "TokenRatioSchedule":
        try:
            d = json.loads(text)
            return cls(depth=[float(x) for x in d["depth"]], progress=[float(x) for x in d["progress"]],
                       ratios=[[float(x) for x in row] for row in d["ratios"]], name=str(d.get("name", "custom")))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a token ratio schedule: {e}") from e


def block_depth(block: int, num_blocks: int) -> float:
    return 0.0 if num_blocks <= 1 else block / (num_blocks - 1)

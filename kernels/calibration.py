"""Calibrate a TokenRatioSchedule to a model: measure redundancy, allocate compression to a FLOPs target.

1. Measure: a probe on an unpatched pass takes each block's update D from consecutive block inputs;
   per ratio option, SDTM's matching gives E(r) = |D - Unmerge(Merge D)|^2, relative to the stream.
2. Allocate: a greedy pass along each (block, step) cell's lower convex hull takes the least error per
   FLOP saved until the target is met; a step's errors weigh (1 - progress)^2 (later steps inherit them).
The last block's update is invisible to the probe, so it stays dense. Why these choices: docs/schedule.md.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable

import torch

from .flops import block_flops
from .runtime import MergingMethod
from .schedule import TokenRatioSchedule, block_depth
from .token_ops import bipartite_merge_plan

RATIO_OPTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # DiffCR's kept-ratio bins 1.0 .. 0.3
MLP_RATIO = 4.0


def merge_errors(x: torch.Tensor, delta: torch.Tensor, grid, options, seed: int = 0) -> list[float]:
    """|D - Unmerge(Merge D)|^2 per ratio in `options`, summed over the batch, with SDTM's bipartite
    matching (2x2 windows) on the block input x."""
    n = x.shape[1]
    window = (1,) * (len(grid) - 2) + (2, 2)
    out = []
    for r in options:
        plan = bipartite_merge_plan(x, grid, window, int(r * n), seed) if r > 0 else None
        if plan is None:
            out.append(0.0)
            continue
        out.append(float((delta - plan.unmerge(plan.merge(delta))).pow(2).sum()))
    return out


@dataclass
class _Seen:
    block: int
    progress: float
    x: torch.Tensor
    grid: tuple


class RedundancyProbe(MergingMethod):
    """A method that measures and never reduces (plan() returns None)."""

    name = "Calibration probe"

    def is_active(self, progress: float) -> bool:
        return True

    def __init__(self, options=RATIO_OPTIONS):
        self.options = tuple(options)
        self.errors: dict[tuple[int, float], list[float]] = {}   # (block, progress) -> error per option
        self.energy: dict[tuple[int, float], float] = {}         # (block, progress) -> |x|^2
        self.n_img = 0
        self.width = 0
        self._prev: _Seen | None = None

    def plan(self, metric: torch.Tensor, grid, block: int, num_blocks: int, progress: float):
        x = metric.detach().float().clone()  # the host's blocks may update their input in place
        self.n_img, self.width = x.shape[1], x.shape[2]
        prev = self._prev
        if prev is not None and prev.block == block - 1 and prev.progress == progress and prev.x.shape == x.shape:
            self._record(prev.block, progress, prev.x, x - prev.x, tuple(grid))
        self._prev = _Seen(block, progress, x, tuple(grid)) if block < num_blocks - 1 else None
        return None

    def _record(self, block, progress, x, delta, grid):
        per_option = merge_errors(x, delta, grid, self.options, seed=block * 7919 + int(progress * 1e6))
        key = (block, progress)
        old = self.errors.get(key)
        self.errors[key] = per_option if old is None else [a + b for a, b in zip(old, per_option)]
        self.energy[key] = self.energy.get(key, 0.0) + float(x.pow(2).sum())


@dataclass
class Calibration:
    schedule: TokenRatioSchedule
    predicted_saving: float          # share of block FLOPs saved, by the cost model
    cell_ratio: dict = field(default_factory=dict)   # (block, progress) -> chosen ratio
    redundancy: dict = field(default_factory=dict)   # (block, progress) -> relative error at ratio 0.5


def allocate(probe: RedundancyProbe, num_blocks: int, n_txt: int, target_saving: float,
             step_weights: dict | None = None, protect_first: int = 0, mlp_ratio: float = MLP_RATIO,
             name: str = "calibrated") -> Calibration:
    """Greedy FLOPs-constrained allocation of ratios over the probe's (block, progress) cells."""
    if not probe.errors:
        raise ValueError("calibration saw no block calls: is the model patched with the probe?")
    if not (0.0 <= target_saving < 1.0):
        raise ValueError(f"target FLOPs saving must lie in [0, 1), got {target_saving}")
    opts = probe.options
    n, c = probe.n_img, probe.width
    progresses = sorted({p for _, p in probe.errors})
    weights = remaining_weights(progresses) if step_weights is None else step_weights
    full = block_flops(n + n_txt, c, mlp_ratio)
    total = full * num_blocks * len(progresses)
    saved_at = [full - block_flops(n - int(r * n) + n_txt, c, mlp_ratio) for r in opts]
    cells = [key for key in probe.errors if key[0] >= protect_first]
    # Errors relative to the step's largest |x|^2: an update error reaches the output at that scale.
    top = {}
    for (b, p), e in probe.energy.items():
        top[p] = max(top.get(p, 0.0), e)
    rel = {key: [e / max(top[key[1]], 1e-30) * _weight(weights, key[1]) for e in probe.errors[key]]
           for key in probe.errors}
    # Lower convex hull per cell: greedy steps come in order of rising marginal cost.
    level = {key: 0 for key in probe.errors}
    heap = []

    def push(key):
        i = level[key]
        best = None
        for j in range(i + 1, len(opts)):
            df = saved_at[j] - saved_at[i]
            if df <= 0:
                continue
            slope = max(rel[key][j] - rel[key][i], 0.0) / df
            if best is None or slope < best[0]:
                best = (slope, j)
        if best is not None:
            heapq.heappush(heap, (best[0], key, best[1]))

    for key in cells:
        push(key)
    goal = target_saving * total
    saved = 0.0
    while saved < goal and heap:
        _, key, j = heapq.heappop(heap)
        saved += saved_at[j] - saved_at[level[key]]
        level[key] = j
        push(key)
    cell_ratio = {key: opts[level[key]] for key in probe.errors}
    depth = [block_depth(i, num_blocks) for i in range(num_blocks)]
    ratios = [[cell_ratio.get((i, p), 0.0) for p in progresses] for i in range(num_blocks)]
    if len(depth) == 1:
        depth = [0.0]
    schedule = TokenRatioSchedule(depth=depth, progress=[float(p) for p in progresses], ratios=ratios, name=name)
    i_half = min(range(len(opts)), key=lambda j: abs(opts[j] - 0.5))
    redundancy = {key: probe.errors[key][i_half] / max(probe.energy[key], 1e-30) for key in probe.errors}
    return Calibration(schedule, saved / total, cell_ratio, redundancy)


def _weight(weights: dict, progress: float) -> float:
    if progress in weights:
        return weights[progress]
    nearest = min(weights, key=lambda p: abs(p - progress))
    return weights[nearest]


def remaining_weights(progresses) -> dict:
    """{progress: (1 - progress)^2}: errors of early steps, which every later step inherits, weigh most."""
    return {p: max(1.0 - p, 1e-3) ** 2 for p in progresses}


def constant_ratio_for_saving(saving: float, n_img: int, n_txt: int, width: int, num_blocks: int,
                              protect_first: int = 0, protect_last: int = 1, mlp_ratio: float = MLP_RATIO) -> float:
    """The constant ratio (in every unprotected block and step) that saves `saving` of block FLOPs."""
    full = block_flops(n_img + n_txt, width, mlp_ratio)
    active = max(num_blocks - protect_first - protect_last, 0)

    def saved(r):
        return active * (full - block_flops(n_img - int(r * n_img) + n_txt, width, mlp_ratio)) / (num_blocks * full)

    lo, hi = 0.0, 0.99
    if saved(hi) < saving:
        raise ValueError(f"a constant ratio cannot save {saving:.3f} of block FLOPs with {active} active blocks")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if saved(mid) < saving else (lo, mid)
    return hi


def calibrate(run_pass: Callable[[RedundancyProbe], None], num_blocks: int, n_txt: int, target_saving: float,
              step_weights: dict | None = None, protect_first: int = 0, passes: int = 1,
              name: str | None = None) -> Calibration:
    """Run `passes` unpatched sampling passes with a probe, then allocate (see the module docstring)."""
    probe = RedundancyProbe()
    with torch.no_grad():
        for _ in range(max(passes, 1)):
            probe._prev = None
            run_pass(probe)
    return allocate(probe, num_blocks, n_txt, target_saving, step_weights, protect_first,
                    name=name or f"calibrated, {100 * target_saving:.0f}% block FLOPs saved")


class CalibrationCache:
    """Calibrated schedules per (model, resolution, sampler settings, target); a small LRU."""

    def __init__(self, size: int = 16):
        self.size = size
        self._items: dict = {}

    def get(self, key):
        item = self._items.pop(key, None)
        if item is not None:
            self._items[key] = item
        return item

    def put(self, key, value):
        self._items.pop(key, None)
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.pop(next(iter(self._items)))


CACHE = CalibrationCache()

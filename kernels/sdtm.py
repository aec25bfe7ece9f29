"""SDTM: structure-then-detail token merging (arXiv 2505.11707), host-independent.

Three parts, each switchable so that its effect can be measured:
- DTM, dynamic token merging: in the structure stage (early, noisy) whole
  windows of mutually similar tokens collapse into one token each (coarse
  layout needs no per-token detail); in the detail stage a fine-grained,
  grid-aware bipartite matching merges single tokens into their most similar
  window representative.
- CRA, compression-ratio adjusting: the ratio follows a cosine from
  ratio + deviation at the first step to ratio - deviation at the last, as in
  the official code, driven by progress (sigma), never by a step counter.
- PR, prompt reweighting: a merged token stands for `size` tokens; its key gets
  a log(size) attention bias so that each group keeps the attention mass it
  had before merging and the text (prompt) tokens keep their share of the
  joint attention rather than gaining weight as image keys disappear.

The method only decides *which* tokens merge per block and step (a MergePlan)
and the attention bias; running a block on merged tokens is
kernels.families.run_block_merged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .detail_cache import DetailCache, DetailCached
from .schedule import TokenRatioSchedule, block_depth
from .token_ops import MergePlan, bipartite_merge_plan, max_merge_ratio, window_merge_plan


@dataclass(frozen=True)
class SDTMConfig:
    """Defaults chosen by measurement on the trained reference model (README, "Evidence"): first 20% of
    progress at full density, whole-window merging throughout, no skipped blocks. The paper's stage
    layout is switch_percent 0.4, start_percent 0, ratio 0.3, deviation 0.2."""
    ratio: float = 0.6
    deviation: float = 0.1
    switch_percent: float = 1.0
    window: int = 2
    skip_first_blocks: int = 0
    skip_last_blocks: int = 0
    dynamic_merge: bool = True
    ratio_adjust: bool = True
    prompt_reweight: bool = True
    start_percent: float = 0.2
    end_percent: float = 1.0
    detail_cache: bool = False    # merged calls reuse the last full call's per-token detail (detail_cache.py)
    seed: int = 0

    def validate(self) -> "SDTMConfig":
        if self.window < 2:
            raise ValueError(f"SDTM: window must be at least 2 (got {self.window})")
        top = max_merge_ratio((self.window, self.window))
        if not (0.0 <= self.ratio <= top):
            raise ValueError(f"SDTM: ratio must lie in [0, {top:.2f}] for a {self.window}x{self.window} window, got {self.ratio}")
        if self.ratio_adjust and (self.ratio - self.deviation < 0.0 or self.ratio + self.deviation > top):
            raise ValueError(
                f"SDTM: ratio +- deviation must stay in [0, {top:.2f}]: ratio {self.ratio} with deviation "
                f"{self.deviation} spans [{self.ratio - self.deviation:.2f}, {self.ratio + self.deviation:.2f}]")
        if self.deviation < 0:
            raise ValueError(f"SDTM: deviation must be >= 0, got {self.deviation}")
        for name in ("switch_percent", "start_percent", "end_percent"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise ValueError(f"SDTM: {name} must lie in [0, 1], got {v}")
        if self.skip_first_blocks < 0 or self.skip_last_blocks < 0:
            raise ValueError("SDTM: skipped block counts must be >= 0")
        return self


class SDTM(DetailCached):
    """Per block and progress: the merge plan, the ratio, and the attention bias."""

    name = "SDTM"

    def __init__(self, config: SDTMConfig, schedule: TokenRatioSchedule | None = None):
        self.config = config.validate()
        self.schedule = schedule
        self._top = max_merge_ratio((config.window, config.window))
        self.detail_cache = DetailCache(config.window) if config.detail_cache else None

    def is_active(self, progress: float) -> bool:
        c = self.config
        return c.start_percent <= progress < c.end_percent

    def ratio(self, block: int, num_blocks: int, progress: float) -> float:
        c = self.config
        if not self.is_active(progress):
            return 0.0
        if block < c.skip_first_blocks or block >= num_blocks - c.skip_last_blocks:
            return 0.0
        if self.schedule is not None:
            r = self.schedule.ratio(block_depth(block, num_blocks), progress)
        elif c.ratio_adjust:
            # Cosine descent from ratio + deviation to ratio - deviation.
            r = (c.ratio - c.deviation) + 2.0 * c.deviation * math.cos(progress * math.pi / 2)
        else:
            r = c.ratio
        return min(max(r, 0.0), self._top)

    def stage(self, progress: float) -> str:
        return "structure" if progress < self.config.switch_percent else "detail"

    def plan(self, metric: torch.Tensor, grid, block: int, num_blocks: int, progress: float) -> MergePlan | None:
        """Merge plan for image tokens `metric` (B, N, C) on `grid`, or None to run unmerged."""
        r = self.ratio(block, num_blocks, progress)
        n = metric.shape[1]
        num_remove = int(r * n)
        if num_remove <= 0:
            return None
        window = (1,) * (len(grid) - 2) + (self.config.window, self.config.window)
        # Destinations move every step and block, so every token is computed on
        # its own now and then (the official code's "last independent" idea).
        seed = self.config.seed * 1_000_003 + block * 7919 + int(round(progress * 1e6))
        if self.config.dynamic_merge and self.stage(progress) == "structure":
            return window_merge_plan(metric, grid, window, num_remove, seed)
        return bipartite_merge_plan(metric, grid, window, num_remove, seed)

    def key_bias(self, plan: MergePlan) -> torch.Tensor | None:
        """Additive attention bias (B, M) for merged image keys, or None when PR is off."""
        if not self.config.prompt_reweight:
            return None
        return plan.sizes.log()

"""SDTM: structure-then-detail token merging (arXiv 2505.11707), host-independent.

DTM merges whole self-similar windows while the structure forms and single tokens into their most
similar window representative later; CRA moves the ratio along a cosine over progress; PR gives each
merged key a log(group size) attention bias so the prompt keeps its share of the attention.
Details and departures from the paper: docs/sdtm.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .detail_cache import DetailCache
from .runtime import MergingMethod, check_fractions
from .schedule import TokenRatioSchedule, block_depth
from .token_ops import MergePlan, bipartite_merge_plan, max_merge_ratio, window_merge_plan


@dataclass(frozen=True)
class SDTMConfig:
    """Defaults set by measurement on the reference models (docs/evidence.md); the paper's stage layout
    is switch_percent 0.4, start_percent 0."""
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
    detail_cache: bool = False
    seed: int = 0

    def validate(self) -> "SDTMConfig":
        if self.window < 2:
            raise ValueError(f"SDTM: window must be at least 2 (got {self.window})")
        top = max_merge_ratio((self.window, self.window))
        if not (0.0 <= self.ratio <= top):
            raise ValueError(f"SDTM: ratio must lie in [0, {top:.2f}] for a {self.window}x{self.window} window, "
                             f"got {self.ratio}")
        if self.ratio_adjust and (self.ratio - self.deviation < 0.0 or self.ratio + self.deviation > top):
            raise ValueError(
                f"SDTM: ratio +- deviation must stay in [0, {top:.2f}]: ratio {self.ratio} with deviation "
                f"{self.deviation} spans [{self.ratio - self.deviation:.2f}, {self.ratio + self.deviation:.2f}]")
        if self.deviation < 0:
            raise ValueError(f"SDTM: deviation must be >= 0, got {self.deviation}")
        check_fractions("SDTM", self, "switch_percent", "start_percent", "end_percent")
        if self.skip_first_blocks < 0 or self.skip_last_blocks < 0:
            raise ValueError("SDTM: skipped block counts must be >= 0")
        return self


# The node's named settings; "balanced" is SDTMConfig's defaults. Each is measured in docs/evidence.md.
PRESETS = {
    "quality": dict(detail_cache=True, start_percent=0.3),
    "balanced": {},
    "fast": dict(ratio=0.7, deviation=0.05),
}
# Settings a connected TokenRatioSchedule replaces (SDTM.ratio reads the schedule instead).
SCHEDULE_REPLACES = ("ratio", "deviation", "ratio_adjust")


class SDTM(MergingMethod):
    name = "SDTM"

    def __init__(self, config: SDTMConfig, schedule: TokenRatioSchedule | None = None):
        self.config = config.validate()
        self.schedule = schedule
        self._top = max_merge_ratio((config.window, config.window))
        self.detail_cache = DetailCache(config.window) if config.detail_cache else None

    def ratio(self, block: int, num_blocks: int, progress: float) -> float:
        c = self.config
        if not self.is_active(progress):
            return 0.0
        if block < c.skip_first_blocks or block >= num_blocks - c.skip_last_blocks:
            return 0.0
        if self.schedule is not None:
            r = self.schedule.ratio(block_depth(block, num_blocks), progress)
        elif c.ratio_adjust:  # cosine from ratio + deviation at the first step to ratio - deviation at the last
            r = (c.ratio - c.deviation) + 2.0 * c.deviation * math.cos(progress * math.pi / 2)
        else:
            r = c.ratio
        return min(max(r, 0.0), self._top)

    def stage(self, progress: float) -> str:
        return "structure" if progress < self.config.switch_percent else "detail"

    def plan(self, tokens: torch.Tensor, grid, block: int, num_blocks: int, progress: float) -> MergePlan | None:
        num_remove = int(self.ratio(block, num_blocks, progress) * tokens.shape[1])
        if num_remove <= 0:
            return None
        window = (1,) * (len(grid) - 2) + (self.config.window, self.config.window)
        # Destinations move with block and step, so every token is computed on its own now and then.
        seed = self.config.seed * 1_000_003 + block * 7919 + int(round(progress * 1e6))
        if self.config.dynamic_merge and self.stage(progress) == "structure":
            return window_merge_plan(tokens, grid, window, num_remove, seed)
        return bipartite_merge_plan(tokens, grid, window, num_remove, seed)

    def key_bias(self, plan: MergePlan) -> torch.Tensor | None:
        return plan.sizes.log() if self.config.prompt_reweight else None

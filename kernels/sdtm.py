"""SDTM: structure-then-detail token merging (arXiv 2505.11707), host-independent.

DTM merges whole self-similar windows while the structure forms, single tokens later; CRA moves the
ratio along a cosine over progress; PR weights each merged key by its group size so the prompt keeps
its share of the attention. Departures from the paper: docs/sdtm.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .detail_cache import MERGING_PRESETS, DetailCache, check_detail_settings
from .runtime import MergingMethod, check_fractions
from .schedule import TokenRatioSchedule, block_depth
from .token_ops import (MergePlan, bipartite_merge_plan, bucket_ratio, max_merge_ratio, window_merge_plan,
                        window_reps)


@dataclass(frozen=True)
class SDTMConfig:
    """Defaults chosen by measurement (docs/sdtm.md); the paper's layout is switch_percent 0.4,
    start_percent 0, no detail cache."""
    ratio: float = 0.84
    deviation: float = 0.04
    switch_percent: float = 1.0
    window: int = 3
    skip_first_blocks: int = 0
    skip_last_blocks: int = 0
    dynamic_merge: bool = True
    ratio_adjust: bool = True
    prompt_reweight: bool = True
    bias_free_attention: bool = False  # PR through a value channel, not a mask (attention.size_weighted_hook)
    start_percent: float = 0.3
    end_percent: float = 1.0
    detail_cache: bool = True     # this and the next three: kernels/detail_cache.py
    refresh_every: int = 2
    forecast: float = 0.5
    detail_weight: float = 0.1
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
        check_detail_settings("SDTM", self)
        return self


PRESETS = MERGING_PRESETS  # the node's presets, shared with the other merging method (detail_cache.py)
# Settings a connected TokenRatioSchedule replaces.
SCHEDULE_REPLACES = ("ratio", "deviation", "ratio_adjust")


# Merging at every step after a warm-up, 2x2 windows, no detail cache: a comparison row.
EVERY_STEP_MERGED = dict(ratio=0.6, deviation=0.1, window=2, start_percent=0.2, detail_cache=False)


class SDTM(MergingMethod):
    name = "SDTM"

    def __init__(self, config: SDTMConfig, schedule: TokenRatioSchedule | None = None):
        self.config = config.validate()
        self.schedule = schedule
        self._top = max_merge_ratio((config.window, config.window))
        self.detail_cache = DetailCache.of(config, config.window)
        self._reps = None  # (step key, every block's window representatives) of the last step
        # A ratio that changes with progress is bucketed (token_ops.RATIO_BUCKETS).
        self._moving_ratio = (schedule.varies_with_progress() if schedule is not None
                              else config.ratio_adjust and config.deviation > 0)

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

    def seed(self, block: int, progress: float) -> int:
        # Destinations move with block and step, so every token is computed on its own now and then.
        return self.config.seed * 1_000_003 + block * 7919 + int(round(progress * 1e6))

    def plan(self, tokens: torch.Tensor, grid, block: int, num_blocks: int, progress: float) -> MergePlan | None:
        r = self.ratio(block, num_blocks, progress)
        num_remove = int((min(bucket_ratio(r), self._top) if self._moving_ratio else r) * tokens.shape[1])
        if num_remove <= 0:
            return None
        window = (1,) * (len(grid) - 2) + (self.config.window, self.config.window)
        if self.config.dynamic_merge and self.stage(progress) == "structure":
            return window_merge_plan(tokens, grid, window, num_remove,
                                     reps=self._window_reps(tuple(grid), window, block, num_blocks, progress,
                                                            tokens.device))
        return bipartite_merge_plan(tokens, grid, window, num_remove, self.seed(block, progress))

    def _window_reps(self, grid, window, block, num_blocks, progress, device) -> torch.Tensor:
        """Block `block`'s window representatives; all blocks' are drawn in one go per step."""
        key = (grid, window, num_blocks, progress, device)
        if self._reps is None or self._reps[0] != key:
            seeds = [self.seed(b, progress) for b in range(num_blocks)]
            self._reps = (key, window_reps(grid, window, seeds, device))
        return self._reps[1][block]

    def weighted_attention(self) -> bool:
        return self.config.prompt_reweight

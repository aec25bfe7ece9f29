"""SDTM: structure-then-detail token merging (arXiv 2505.11707), host-independent.

DTM merges whole self-similar windows while the structure forms, single tokens later; CRA moves the
ratio along a cosine over progress; PR weights each merged key by its group size so the prompt keeps
its share of the attention. Departures from the paper: docs/sdtm.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .detail_cache import MERGING_PRESETS, DetailCache, DetailSettings, detail_settings
from .method_spec import MethodSpec, Setting, progress_window_settings
from .runtime import MergingMethod, check_fractions
from .schedule import TokenRatioSchedule, block_depth
from .schedule_presets import MAX_RATIO
from .token_ops import (MergePlan, bipartite_merge_plan, bucket_ratio, max_merge_ratio, window_merge_plan,
                        window_reps)

NAME = "SDTM"  # logs, tables, error messages, the support matrix


@dataclass(frozen=True)
class SDTMConfig(DetailSettings):
    """Defaults chosen by measurement (docs/sdtm.md); the paper's layout is switch_percent 0.4,
    start_percent 0, no detail cache. Validated on construction."""
    ratio: float = 0.84
    deviation: float = 0.04
    switch_percent: float = 1.0
    window: int = 3
    skip_first_blocks: int = 0
    skip_last_blocks: int = 0
    dynamic_merge: bool = True
    ratio_adjust: bool = True
    prompt_reweight: bool = True
    start_percent: float = 0.3
    end_percent: float = 1.0

    def __post_init__(self):
        if self.window < 2:
            raise ValueError(f"{NAME}: window must be at least 2 (got {self.window})")
        top = max_merge_ratio((self.window, self.window))
        if not (0.0 <= self.ratio <= top):
            raise ValueError(f"{NAME}: ratio must lie in [0, {top:.2f}] for a {self.window}x{self.window} window, "
                             f"got {self.ratio}")
        if self.ratio_adjust and (self.ratio - self.deviation < 0.0 or self.ratio + self.deviation > top):
            raise ValueError(
                f"{NAME}: ratio +- deviation must stay in [0, {top:.2f}]: ratio {self.ratio} with deviation "
                f"{self.deviation} spans [{self.ratio - self.deviation:.2f}, {self.ratio + self.deviation:.2f}]")
        if self.deviation < 0:
            raise ValueError(f"{NAME}: deviation must be >= 0, got {self.deviation}")
        check_fractions(NAME, self, "switch_percent", "start_percent", "end_percent")
        if self.skip_first_blocks < 0 or self.skip_last_blocks < 0:
            raise ValueError(f"{NAME}: skipped block counts must be >= 0")
        self.check_detail_settings(NAME)


SEED = 0  # of the bipartite matching and the window representatives


class SDTM(MergingMethod):
    name = NAME

    def __init__(self, config: SDTMConfig, schedule: TokenRatioSchedule | None = None,
                 bias_free_attention: bool = False):
        super().__init__(config, schedule, bias_free_attention)
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
        return SEED * 1_000_003 + block * 7919 + int(round(progress * 1e6))

    def num_remove(self, n_img: int, block: int, num_blocks: int, progress: float) -> int:
        """Image tokens this block merges away."""
        r = self.ratio(block, num_blocks, progress)
        return int((min(bucket_ratio(r), self._top) if self._moving_ratio else r) * n_img)

    def merges(self, call) -> bool:
        return any(self.num_remove(call.n_img, b, call.num_blocks, call.progress) > 0 for b in range(call.num_blocks))

    def plan(self, tokens: torch.Tensor, grid, block: int, num_blocks: int, progress: float) -> MergePlan | None:
        num_remove = self.num_remove(tokens.shape[1], block, num_blocks, progress)
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


# Merging at every step after a warm-up, 2x2 windows, no detail cache: the earlier defaults, and the mechanics tests.
EVERY_STEP_MERGED = dict(ratio=0.6, deviation=0.1, window=2, start_percent=0.2, detail_cache=False)

SPEC = MethodSpec(
    key="sdtm", name=NAME, node_id="SDTMPatchModel", display_name="SDTM Token Merging",
    description=("Structure-then-detail token merging (arXiv 2505.11707) for {families}: similar image tokens are merged "
                 "inside each transformer block and restored after it, so every step costs less. Place between the "
                 "model loader and the sampler."),
    amount="How much to merge", config=SDTMConfig, method=SDTM,
    presets=MERGING_PRESETS,  # shared with the density schedule (detail_cache.py)
    settings=(
        Setting("ratio", "Mean fraction of image tokens merged away in each merged block. Higher is faster.",
                0.0, MAX_RATIO, 0.01),
        Setting("deviation", "The ratio runs from ratio + deviation at the first step to ratio - deviation at the "
                             "last; both ends must stay below what the window allows (8/9 for 3x3).", 0.0, 0.5, 0.01),
        Setting("switch_percent", "Progress where whole-window merging (structure) hands over to per-token matching "
                                  "(detail); 1 keeps whole windows throughout.", 0.0, 1.0, 0.01),
        Setting("window", "Merge window on the token grid (2 = 2x2 tokens).", 2, 4),
        Setting("skip_first_blocks", "This many first transformer blocks always run on every token.", 0, 64),
        Setting("skip_last_blocks", "This many last transformer blocks always run on every token.", 0, 64),
        Setting("dynamic_merge", "Whole similar windows early, single tokens later (the paper's DTM). Off: single "
                                 "tokens throughout."),
        Setting("ratio_adjust", "Vary the ratio with progress as `deviation` says (the paper's CRA). Off: constant."),
        Setting("prompt_reweight", "A merged token draws the attention of the tokens it stands for, so the prompt "
                                   "keeps its share (the paper's PR)."),
        *progress_window_settings("merge"),
        *detail_settings("merged"),
    ),
    schedule_replaces=("ratio", "deviation", "ratio_adjust"),
    schedule_tooltip=("Per-layer, per-progress ratios from the Token Ratio Schedule node; replaces ratio and deviation "
                      "(in every preset)."),
    output_tooltip="The model with SDTM token merging.",
    comparisons={
        "merged calls ignored (detail_weight 0)": dict(detail_weight=0.0),
        "every step merged (the earlier defaults)": EVERY_STEP_MERGED,
        "paper's stage layout (from step 1, switch 0.4, skip 1/1, no detail cache)": dict(
            ratio=0.5, deviation=0.2, window=2, switch_percent=0.4, start_percent=0.0, skip_first_blocks=1,
            skip_last_blocks=1, detail_cache=False),
    },
    every_step=EVERY_STEP_MERGED,
)

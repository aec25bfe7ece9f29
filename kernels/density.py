"""Token density schedule: FlexDiT (arXiv 2412.06028) made training-free, host-independent.

In chosen blocks and steps the image tokens are average-pooled in k x k windows (a MergePlan, run like
SDTM) and the update returns to every token: X + Up(F(Pool X) - Pool X). docs/density.md.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .detail_cache import MERGING_PRESETS, DetailCache, DetailSettings, detail_settings
from .method_spec import MethodSpec, Setting, progress_window_settings
from .runtime import MergingMethod, check_fractions
from .schedule import TokenRatioSchedule, block_depth
from .schedule_presets import FLEXDIT_STAGE_BOUNDS
from .token_ops import MergePlan, plan_from_targets

NAME = "Density"  # logs, tables, error messages, the support matrix

MAX_WINDOW = 4
SPAN = 6          # FlexDiT's span length
SPAN_POOLED = 4   # pooled blocks at the start of each span


def window_ratio(k: int) -> float:
    """Nominal fraction of image tokens a k x k pooling removes."""
    return 1.0 - 1.0 / (k * k)


def window_for_ratio(r: float, max_window: int = MAX_WINDOW) -> int:
    """The window k in 1..max_window whose ratio 1 - 1/k^2 is nearest to r (ties to the smaller k)."""
    best = 1
    for k in range(2, max_window + 1):
        if abs(window_ratio(k) - r) < abs(window_ratio(best) - r):
            best = k
    return best


def parse_stage_windows(text: str) -> tuple[int, ...]:
    """"2, 2, 2, 1" -> (2, 2, 2, 1): the window per FlexDiT stage, noisiest first."""
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    if len(parts) != 4:
        raise ValueError(f"{NAME}: stage_windows needs 4 comma-separated windows (one per noise stage, "
                         f"noisiest first), e.g. \"2, 2, 2, 1\"; got {text!r}")
    out = []
    for p in parts:
        try:
            k = int(p)
        except ValueError:
            raise ValueError(f"{NAME}: stage_windows entry {p!r} is not a whole number") from None
        if not (1 <= k <= MAX_WINDOW):
            raise ValueError(f"{NAME}: stage_windows entries must lie in 1..{MAX_WINDOW} (1 = dense), got {k}")
        out.append(k)
    return tuple(out)


@dataclass(frozen=True)
class DensityConfig(DetailSettings):
    """Defaults chosen by measurement (docs/density.md); FLEXDIT_LAYOUT is the paper's layout. Validated on
    construction."""
    stage_windows: tuple = (3, 3, 3, 3)   # window per noise stage, noisiest first
    stage_bounds: tuple = FLEXDIT_STAGE_BOUNDS
    bottom_dense: float = 0.0             # fraction of blocks at the bottom kept dense (at least 1 if > 0)
    top_dense: float = 0.0                # fraction of blocks at the top kept dense
    span_pattern: bool = False            # middle blocks: FlexDiT's [pooled x 4, dense x 2] spans
    proportional_attention: bool = True
    start_percent: float = 0.3
    end_percent: float = 1.0

    def __post_init__(self):
        if len(self.stage_windows) != 4 or any(not (1 <= int(k) <= MAX_WINDOW) for k in self.stage_windows):
            raise ValueError(f"{NAME}: stage_windows must be 4 windows in 1..{MAX_WINDOW}, got "
                             f"{self.stage_windows}")
        b = self.stage_bounds
        if len(b) != 3 or not (0.0 <= b[0] <= b[1] <= b[2] <= 1.0):
            raise ValueError(f"{NAME}: stage bounds must be 3 increasing progress values, got {b}")
        check_fractions(NAME, self, "bottom_dense", "top_dense", "start_percent", "end_percent")
        self.check_detail_settings(NAME)


class DensitySchedule(MergingMethod):
    """Per block and progress: the pooling window k, its MergePlan and the attention bias."""

    name = NAME

    def __init__(self, config: DensityConfig, schedule: TokenRatioSchedule | None = None,
                 bias_free_attention: bool = False):
        super().__init__(config, schedule, bias_free_attention)
        self.detail_cache = DetailCache.of(config, max(config.stage_windows))

    def stage(self, progress: float) -> int:
        return sum(progress >= b for b in self.config.stage_bounds)

    def block_pooled(self, block: int, num_blocks: int) -> bool:
        """The spatial schedule: bottom and top dense, middle in FlexDiT spans."""
        c = self.config
        bottom = math.ceil(c.bottom_dense * num_blocks - 1e-9)
        top = math.ceil(c.top_dense * num_blocks - 1e-9)
        if block < bottom or block >= num_blocks - top:
            return False
        return not c.span_pattern or (block - bottom) % SPAN < SPAN_POOLED

    def window(self, block: int, num_blocks: int, progress: float) -> int:
        if not self.is_active(progress):
            return 1
        if self.schedule is not None:
            return window_for_ratio(self.schedule.ratio(block_depth(block, num_blocks), progress))
        if not self.block_pooled(block, num_blocks):
            return 1
        return int(self.config.stage_windows[self.stage(progress)])

    def merges(self, call) -> bool:
        return any(self.window(b, call.num_blocks, call.progress) > 1 for b in range(call.num_blocks))

    def plan(self, tokens: torch.Tensor, grid, block: int, num_blocks: int, progress: float) -> MergePlan | None:
        k = self.window(block, num_blocks, progress)
        if k <= 1:
            return None
        plan = batched_pool_plan(tuple(int(g) for g in grid), k, tokens.device, tokens.shape[0])
        return None if plan.n_out >= plan.n_in else plan

    def weighted_attention(self) -> bool:
        return self.config.proportional_attention


@functools.lru_cache(maxsize=64)
def pool_plan(grid: tuple, k: int, device) -> MergePlan:
    """MergePlan (batch 1) pooling the last two grid axes in k x k windows (partial at the edges; frames are
    not pooled). A window keeps the position of its member nearest the centre (top-left of it for even k)."""
    grid = tuple(int(g) for g in grid)
    h, w = grid[-2], grid[-1]
    frames = 1
    for g in grid[:-2]:
        frames *= g
    rows = torch.arange(h)
    cols = torch.arange(w)
    r0 = (rows // k) * k
    c0 = (cols // k) * k
    rh = torch.clamp(torch.minimum(r0 + k, torch.tensor(h)) - r0, min=1)  # window height per row
    cw = torch.clamp(torch.minimum(c0 + k, torch.tensor(w)) - c0, min=1)
    rep_r = r0 + (rh - 1) // 2
    rep_c = c0 + (cw - 1) // 2
    rep_in_frame = (rep_r[:, None] * w + rep_c[None, :]).reshape(-1)  # (h*w,)
    offsets = torch.arange(frames) * (h * w)
    target = (offsets[:, None] + rep_in_frame[None, :]).reshape(1, -1)
    m = frames * math.ceil(h / k) * math.ceil(w / k)
    plan = plan_from_targets(target, m)
    device = torch.device(device)
    if device.type != "cpu":
        plan = MergePlan(plan.assign.to(device), plan.rep.to(device), plan.sizes.to(device))
    return plan


@functools.lru_cache(maxsize=64)
def batched_pool_plan(grid: tuple, k: int, device, batch: int) -> MergePlan:
    """pool_plan for `batch` rows; one object for every block and step, so its derived views are built once."""
    return pool_plan(grid, k, device).expand(batch)


# Pooling 2x2 at every step after a warm-up, no detail cache: the earlier defaults, and the mechanics tests.
EVERY_STEP_POOLED = dict(stage_windows=(2, 2, 2, 2), start_percent=0.2, detail_cache=False)
# FlexDiT's layout made training-free: pooling from the first step, no detail cache.
FLEXDIT_LAYOUT = dict(stage_windows=(2, 2, 2, 1), bottom_dense=0.07, top_dense=0.07, span_pattern=True,
                      start_percent=0.0, detail_cache=False)

SPEC = MethodSpec(
    key="density", name=NAME, node_id="TokenDensityPatchModel", display_name="Token Density Schedule",
    description=("Training-free FlexDiT (arXiv 2412.06028) for {families}: in chosen blocks and steps the image "
                 "tokens are average-pooled into a coarser grid, the block runs on the pooled tokens plus the full "
                 "text, and its update is spread back onto every token."),
    amount="How much to pool", config=DensityConfig, method=DensitySchedule,
    presets=MERGING_PRESETS,  # shared with SDTM (detail_cache.py)
    settings=(
        Setting("stage_windows", "Pooling window per noise stage, noisiest first: 4 entries in 1-4 (2 = 2x2 tokens "
                                 "averaged, 1 = every token), e.g. \"2, 2, 2, 1\" as FlexDiT.",
                parse=parse_stage_windows),
        Setting("bottom_dense", "Fraction of the first blocks that always run on every token (rounded up).",
                0.0, 1.0, 0.01),
        Setting("top_dense", "Fraction of the last blocks that always run on every token (rounded up).",
                0.0, 1.0, 0.01),
        Setting("span_pattern", "Middle blocks in FlexDiT's spans of 6: 4 pooled, then 2 on every token."),
        Setting("proportional_attention", "A pooled token draws the attention of the tokens it stands for, so the "
                                          "prompt keeps its share."),
        *progress_window_settings("pool"),
        *detail_settings("pooled"),
    ),
    schedule_replaces=("stage_windows", "bottom_dense", "top_dense", "span_pattern"),
    schedule_tooltip=("Ratios from the Token Ratio Schedule node decide every block and step (each ratio picks the "
                      "nearest pooling window); stage_windows and the dense blocks are unused."),
    output_tooltip="The model with the token density schedule.",
    comparisons={
        "every step pooled (the earlier defaults)": EVERY_STEP_POOLED,
        "FlexDiT layout (dense bottom/top blocks and spans, from step 1)": FLEXDIT_LAYOUT,
    },
    every_step=EVERY_STEP_POOLED,
)

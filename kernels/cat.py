"""CAT Pruning: cluster-aware cached token pruning (arXiv 2502.00433), host-independent.

A pruned step computes only the image tokens whose noise changed most (cluster by cluster) plus the
least recently computed ones; the others keep their cached keys, values and noise, the noise carried
along its trend (forecast.py; the paper holds it). Departures from the paper: docs/cat.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .block_runners import run_block_pruned
from .cat_select import cluster_counts, kmeans_labels_batched, select_tokens_batched
from .forecast import Trend
from .kv_cache import CACHE_DTYPES
from .method_spec import MethodSpec, Setting, progress_window_settings
from .runtime import BlockCall, StepCounter, TokenMethod, call_rows, check_fractions
from .schedule import TokenRatioSchedule, block_depth
from .token_ops import RATIO_BUCKETS, bucket_ratio, patchify, unpatchify, zeros_like_shape

NAME = "CAT"  # logs, tables, error messages, the support matrix
SEED = 0      # of the k-means initialisation


@dataclass(frozen=True)
class CATConfig:
    """Validated on construction."""
    ratio: float = 0.95         # fraction of image tokens not computed per pruned step (1: none, the step is skipped)
    full_percent: float = 0.28  # progress before which every step runs in full (the paper's t0)
    refresh_every: int = 2      # a full step after this many pruned steps (0: never, as the paper)
    clusters: int = 20
    balance: float = 0.75       # fraction of kept tokens chosen as the least recently computed
    forecast: float = 0.5       # damping of the cached noise's trend (0: held, as the paper)
    start_percent: float = 0.0
    end_percent: float = 1.0
    cache_dtype: str = "model"  # cached keys/values: CACHE_DTYPES (kv_cache.py)

    def __post_init__(self):
        if not (0.0 <= self.ratio <= 1.0):
            raise ValueError(f"{NAME}: ratio must lie in [0, 1], got {self.ratio}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"{NAME}: cache_dtype must be one of {', '.join(CACHE_DTYPES)}, "
                             f"got {self.cache_dtype!r}")
        check_fractions(NAME, self, "full_percent", "start_percent", "end_percent", "balance", "forecast")
        if self.clusters < 1:
            raise ValueError(f"{NAME}: clusters must be >= 1, got {self.clusters}")
        if self.refresh_every < 0:
            raise ValueError(f"{NAME}: refresh_every must be >= 0, got {self.refresh_every}")


# The paper's setting, a comparison row in the evidence.
PAPER_SETTING = dict(ratio=0.7, full_percent=0.28, refresh_every=0, forecast=0.0)
# The faster preset: fewer full steps while the layout forms.
FAST_SETTING = dict(full_percent=0.18)
# The node's presets ("balanced": the defaults), measured in docs/evidence.md.
PRESETS = {
    "quality": dict(refresh_every=1),
    "balanced": {},
    "fast": FAST_SETTING,
}
# Settings a connected TokenRatioSchedule replaces.
SCHEDULE_REPLACES = ("ratio",)


# ---- per-run state --------------------------------------------------------------------------------

@dataclass
class RowState:
    """History of one batch row (one image of one conditioning)."""

    prev: torch.Tensor | None = None    # last predicted noise per token (N, D), float32
    before: torch.Tensor | None = None  # the one before (becomes the reference)
    ref: torch.Tensor | None = None     # frozen at the first pruned step
    labels: torch.Tensor | None = None  # clusters, computed at the first pruned step
    counts: torch.Tensor | None = None  # tokens per cluster (k,)
    age: torch.Tensor | None = None     # steps since each token was last computed (N,)
    sigma: float | None = None          # sigma of the step `prev` belongs to
    trend: Trend = field(default_factory=Trend)  # its full steps, for the forecast


@dataclass
class CallPlan:
    """The decision for one model call."""

    rows: tuple                          # row keys
    selection: torch.Tensor | None       # (B, n_keep) token indices, or None for a full call
    signature: tuple = ()
    pruned: bool = False                 # some block of the call ran on the selection (a block may run unreduced)
    skip: bool = False                   # nothing to compute: every token served from its forecast, no block runs


@dataclass
class CATRunState:
    """Everything CAT keeps during one sampling run; `clear()` frees it."""

    rows: dict = field(default_factory=dict)
    kv: dict = field(default_factory=dict)   # call signature -> {(block, attention call): K/V tensors}
    latent: tuple | None = None
    steps: StepCounter = field(default_factory=StepCounter)
    peak_cache_bytes: int = 0

    def clear(self):
        self.rows.clear()
        self.kv.clear()
        self.latent = None
        self.steps = StepCounter()

    def cache_bytes(self) -> int:
        total = 0
        for per_block in self.kv.values():
            for per_call in per_block.values():
                for entry in per_call.values():
                    total += sum(t.numel() * t.element_size() for t in entry.values() if isinstance(t, torch.Tensor))
        for r in self.rows.values():
            for t in (r.prev, r.before, r.ref, r.labels, r.counts, r.age, r.trend.full, r.trend.slope):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


class CATPruning(TokenMethod):
    """Per model call: full or pruned, and which image tokens each row computes (a CallPlan, the decision
    begin_call returns)."""

    name = NAME
    composable = False  # its block runner gathers tokens; other token-reduction patches cannot nest

    def __init__(self, config: CATConfig, schedule: TokenRatioSchedule | None = None):
        self.config = config
        self.schedule = schedule
        # ratio 1 without a schedule: a pruned step runs no block, so no key or value is ever read
        self.keeps_kv = schedule is not None or config.ratio < 1.0

    def new_run_state(self) -> CATRunState:
        return CATRunState()

    def ratio(self, progress: float, num_blocks: int = 1) -> float:
        """Fraction pruned at `progress`; a schedule is averaged over depth (and bucketed if it moves)."""
        if self.schedule is None:
            return self.config.ratio
        vals = [self.schedule.ratio(block_depth(i, num_blocks), progress) for i in range(num_blocks)]
        r = sum(vals) / len(vals)
        if not self.schedule.varies_with_progress():
            return min(max(r, 0.0), 0.99)
        top = 1.0 - 1.0 / RATIO_BUCKETS  # the largest bucket that keeps a token
        return min(max(bucket_ratio(r), 0.0), top)

    def n_keep(self, n_img: int, progress: float, num_blocks: int = 1) -> int:
        return n_img - int(self.ratio(progress, num_blocks) * n_img)

    def begin_call(self, state: CATRunState, call, x: torch.Tensor) -> CallPlan | None:
        """Decide full or pruned for this call (None: outside the window, the unpatched model, nothing
        recorded); resets the state on a new run or a new latent."""
        sigma = float(call.sigma)
        latent = (tuple(x.shape[1:]), x.dtype, x.device, tuple(call.grid))
        if state.latent != latent or state.steps.starts_new_run(sigma):
            state.clear()  # new latent (shape, dtype, device) or sigma went up: a new run
            state.latent = latent
        state.steps.count(sigma)
        if not self.is_active(call.progress) or len(call.grid) not in (2, 3):
            state.steps.last_full = True
            return None
        rows = call_rows(call, x.shape[0])
        signature = (rows, x.shape[0])
        n_keep = self.n_keep(call.n_img, call.progress, call.num_blocks)
        full = (self._scheduled_full(call.progress, n_keep, call.n_img, state.steps.reduced_since_full)
                or any(state.rows.get(r) is None or state.rows[r].prev is None for r in rows)
                or (n_keep > 0 and signature not in state.kv)
                or (n_keep == 0 and not call.replaceable))
        state.steps.last_full = full
        if full:
            return CallPlan(rows, None, signature)
        if n_keep == 0:  # nothing to compute: every token is served from its forecast
            empty = torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device)
            return CallPlan(rows, empty, signature, pruned=True, skip=True)
        selection = self._select([state.rows[r] for r in rows], call.grid, n_keep)
        return CallPlan(rows, selection if selection.device == x.device else selection.to(x.device), signature)

    def _scheduled_full(self, progress: float, n_keep: int, n_img: int, pruned_since_full: int) -> bool:
        c = self.config
        return (progress < c.full_percent or n_keep >= n_img
                or (c.refresh_every > 0 and pruned_since_full >= c.refresh_every))

    def _select(self, rows: list, grid, n_keep: int) -> torch.Tensor:
        """(B, n_keep) tokens to compute, one row per RowState, chosen for all rows at once."""
        c = self.config
        first = tuple(row.ref is None for row in rows)
        new = [row for row in rows if row.labels is None]
        if new:  # clusters once per run, at the first pruned step
            prev = torch.stack([row.prev for row in new])
            k = min(c.clusters, prev.shape[1])
            labels = kmeans_labels_batched(prev, grid, c.clusters, seed=SEED)
            for row, lab, cnt in zip(new, labels.unbind(0), cluster_counts(labels, k).unbind(0)):
                row.labels, row.counts = lab, cnt
        for row in rows:
            if row.ref is None:
                row.ref = row.before if row.before is not None else row.prev
        stack = [torch.stack(t) for t in zip(*((row.prev, row.ref, row.labels, row.age, row.counts) for row in rows))]
        prev, ref, labels, age, counts = stack
        return select_tokens_batched(prev - ref, labels, age, n_keep, c.balance,
                                     first[0] if len(set(first)) == 1 else first, counts)

    def _forecast(self, row: RowState, sigma: float) -> torch.Tensor:
        """The row's cached noise carried from its last step to `sigma`, while the trend holds."""
        return row.trend.carry(row.prev, row.sigma, sigma, self.config.forecast)

    def end_call(self, state: CATRunState, call, plan: CallPlan | None, noise: torch.Tensor):
        """Record this call's noise (B, C, H, W). Returns (noise with the others' cached noise carried to
        this sigma, computed pixel mask), or None when all were computed."""
        if plan is None:
            return None
        grid, patch = call.grid, call.patch
        tokens = patchify(noise.float(), grid, patch)  # a fresh tensor: rows keep views of it
        sigma = state.steps.last_sigma
        replaced = None
        if plan.pruned:  # some block pruned (a block may run unreduced)
            keep = zeros_like_shape(tokens.shape[:2], torch.bool, tokens.device).scatter(1, plan.selection, True)
            cached = torch.stack([self._forecast(state.rows[r], sigma).to(tokens.device) for r in plan.rows])
            replaced = torch.where(keep[..., None], tokens, cached)
            ages = torch.stack([state.rows[r].age for r in plan.rows]).add_(1).scatter_(1, plan.selection, 0)
            for key, prev, age in zip(plan.rows, replaced.unbind(0), ages.unbind(0)):
                row = state.rows[key]
                row.prev, row.age, row.sigma = prev, age, sigma
        else:
            age = zeros_like_shape(tokens.shape[1:2], torch.long, tokens.device)  # read-only: replaced, not added to
            for key, tok in zip(plan.rows, tokens.unbind(0)):
                row = state.rows.setdefault(key, RowState())
                if row.sigma != sigma:
                    row.before = row.prev
                row.trend.record(tok, sigma, self.config.forecast)
                row.prev = tok  # the same tensor as the trend's: replaced, never written in place
                row.age, row.sigma = age, sigma
        state.peak_cache_bytes = max(state.peak_cache_bytes, state.cache_bytes())
        if replaced is None:
            return None
        mask = unpatchify(keep[..., None].expand(-1, -1, tokens.shape[2]).float(), noise.shape, patch) > 0.5
        return unpatchify(replaced, noise.shape, patch).to(noise.dtype), mask

    def run_block(self, block: BlockCall) -> dict:
        state = block.run.state if block.run is not None else None
        plan = block.decision
        if state is None or plan is None or not self.keeps_kv:
            block.count(block.span.n_img)
            return block.original(block.args)
        store = state.kv.setdefault(plan.signature, {}).setdefault(block.spec.index, {})
        selection = plan.selection
        if selection is not None and selection.shape[0] != block.args["img"].shape[0]:
            selection = None  # the block sees another batch than the call (should not happen)
        if selection is not None and not store:
            selection = None  # no cached keys/values for this block yet: compute it in full
        block.count(block.span.n_img if selection is None else selection.shape[1], block.span.n_img)
        plan.pruned = plan.pruned or selection is not None
        if block.observed:  # 1 = computed, 0 = served from cache
            x = block.args["img"]
            computed = torch.ones(x.shape[0], block.span.n_img, device=x.device)
            if selection is not None:
                computed = torch.zeros_like(computed).scatter_(1, selection, 1.0)
            block.report_computed(computed)
        return run_block_pruned(block.args, block.original, block.span, block.family, selection, store,
                                block.call.shared, block.pieces(), self.config.cache_dtype == "fp8")


SPEC = MethodSpec(
    key="cat", name=NAME, node_id="CATPruningPatchModel", display_name="CAT Cached Token Pruning",
    description=("Cluster-aware cached token pruning (arXiv 2502.00433) for {families}: after the first steps, most "
                 "steps compute only the image tokens whose prediction changes most; the others reuse their cached "
                 "values, carried along their recent trend. Place between the model loader and the sampler."),
    amount="How much to prune", config=CATConfig, method=CATPruning, presets=PRESETS,
    settings=(
        Setting("ratio", "Fraction of image tokens not computed in a pruned step. Higher is faster; 1 computes none: "
                         "a pruned step is served from the forecast alone.", 0.0, 1.0, 0.01),
        Setting("full_percent", "Progress before which every step runs on every token (the layout forms there).",
                0.0, 1.0, 0.01),
        Setting("refresh_every", "One full step after this many pruned steps refreshes every cached value (0 = "
                                 "never, as the paper).", 0, 100),
        Setting("clusters", "Spatial clusters; those whose prediction changes most get the most recomputed tokens.",
                1, 256),
        Setting("balance", "Share of the computed tokens given to those computed least recently.", 0.0, 1.0, 0.01),
        *progress_window_settings("prune", "; later steps run on every token"),
        Setting("forecast", "How far a cached token follows the trend of its last two full steps (0 = holds its last "
                            "value, as the paper); switched off while the trend predicts worse than holding.",
                0.0, 1.0, 0.05),
        Setting("cache_dtype", "Storage of the cached keys and values: the model's dtype, or fp8 (float8 with a scale "
                               "per token) for a smaller cache at a small cost in fidelity.", options=CACHE_DTYPES),
    ),
    schedule_replaces=("ratio",),
    schedule_tooltip=("Fraction pruned per progress from the Token Ratio Schedule node (averaged over depth); replaces "
                      "ratio (in every preset)."),
    output_tooltip="The model with CAT cached token pruning.",
    comparisons={
        "forecast 0 (cached noise held, as the paper)": dict(forecast=0.0),
        "ratio 0.99 (reuse between full steps only)": dict(ratio=0.99),
        "paper's setting (ratio 0.7, no refresh, no forecast)": PAPER_SETTING,
    },
)

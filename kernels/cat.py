"""CAT Pruning: cluster-aware cached token pruning (arXiv 2502.00433), host-independent.

A pruned step computes only the image tokens whose noise changed most (cluster by cluster) plus the
least recently computed ones; the others keep their cached keys, values and noise, the noise carried
along its trend (forecast.py; the paper holds it). Departures from the paper: docs/cat.md.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import image_key_start, override_attention, seq_dim
from .families import join_tokens, per_token_vec, split_tokens, with_image_pe
from .forecast import Trend
from .runtime import BlockCall, StepCounter, TokenMethod, call_rows, check_fractions, observing, report_computed
from .schedule import TokenRatioSchedule, block_depth
from .token_ops import RATIO_BUCKETS, bucket_ratio, take_rows, zeros_like_shape

TOP_CLUSTER_QUOTA = (3, 2, 1)  # quota multipliers of the three highest-scoring clusters
BASE_QUOTA = 0.05              # base per-cluster quota, as a fraction of the kept tokens
POSITION_WEIGHT_NOISE = 0.05   # clustering feature = POSITION_WEIGHT_NOISE x noise + position
KMEANS_ITERS = 10


CACHE_DTYPES = ("model", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class CATConfig:
    ratio: float = 0.95         # fraction of image tokens not computed per pruned step
    full_percent: float = 0.28  # progress before which every step runs in full (the paper's t0)
    refresh_every: int = 2      # a full step after this many pruned steps (0: never, as the paper)
    clusters: int = 20
    balance: float = 0.75       # fraction of kept tokens chosen as the least recently computed
    forecast: float = 0.5       # damping of the cached noise's trend (0: held, as the paper)
    start_percent: float = 0.0
    end_percent: float = 1.0
    seed: int = 0
    cache_dtype: str = "model"  # cached keys/values: CACHE_DTYPES (quantize_fp8)

    def validate(self) -> "CATConfig":
        if not (0.0 <= self.ratio < 1.0):
            raise ValueError(f"CAT Pruning: ratio must lie in [0, 1), got {self.ratio}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"CAT Pruning: cache_dtype must be one of {', '.join(CACHE_DTYPES)}, "
                             f"got {self.cache_dtype!r}")
        check_fractions("CAT Pruning", self, "full_percent", "start_percent", "end_percent", "balance", "forecast")
        if self.clusters < 1:
            raise ValueError(f"CAT Pruning: clusters must be >= 1, got {self.clusters}")
        if self.refresh_every < 0:
            raise ValueError(f"CAT Pruning: refresh_every must be >= 0, got {self.refresh_every}")
        return self




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


# ---- selection (pure functions) -----------------------------------------------------------------

def position_features(grid, dim: int, device=None) -> torch.Tensor:
    """(N, dim): each grid axis fills its share of the channels with coordinate / size."""
    coords = torch.meshgrid(*[torch.arange(g, device=device, dtype=torch.float32) / g for g in grid], indexing="ij")
    coords = [c.reshape(-1) for c in coords]
    bounds = [round(i * dim / len(grid)) for i in range(len(grid) + 1)]
    out = torch.zeros(coords[0].shape[0], dim, device=device)
    for c, a, b in zip(coords, bounds[:-1], bounds[1:]):
        out[:, a:b] = c[:, None]
    return out


def kmeans_labels(noise: torch.Tensor, grid, k: int, seed: int = 0, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """Cluster label (N,) per token: seeded Lloyd's k-means on weighted noise + position."""
    return kmeans_labels_batched(noise.unsqueeze(0), grid, k, seed, iters)[0]


def kmeans_labels_batched(noise: torch.Tensor, grid, k: int, seed: int = 0, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """kmeans_labels for every row of noise (B, N, D): (B, N). Always `iters` steps: a converged labelling
    is a fixed point, so this equals stopping at convergence without a device sync."""
    b, n, d = noise.shape
    if k >= n:
        return torch.arange(n, device=noise.device).expand(b, n)
    feats = POSITION_WEIGHT_NOISE * noise.float() + position_features(grid, d, noise.device)
    gen = torch.Generator().manual_seed(seed)
    centres = feats[:, torch.randperm(n, generator=gen)[:k].to(noise.device)]  # (B, k, D)
    ones = torch.ones((), device=noise.device).expand(b, n)
    for _ in range(iters):
        labels = (feats[:, :, None, :] - centres[:, None]).pow(2).sum(-1).argmin(2)  # (B, N)
        sums = torch.zeros_like(centres).scatter_add_(1, labels[..., None].expand(b, n, d), feats)
        counts = torch.zeros(b, k, device=noise.device).scatter_add_(1, labels, ones)
        # empty clusters keep their centre
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1.0)[..., None], centres)
    return labels


def cluster_counts(labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) tokens per cluster of labels (B, N), counted without a device sync."""
    return torch.zeros(labels.shape[0], k, dtype=torch.long, device=labels.device).scatter_add_(
        1, labels, torch.ones((), dtype=torch.long, device=labels.device).expand(labels.shape))


def cluster_scores(delta: torch.Tensor, labels: torch.Tensor, k: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """(k,) norm of each cluster's element-wise max |delta|, -1 when empty; batched inputs give (B, k)."""
    if delta.ndim == 2:
        return cluster_scores(delta.unsqueeze(0), labels.unsqueeze(0), k,
                              None if counts is None else counts.unsqueeze(0))[0]
    d = delta.abs().float()
    pooled = torch.zeros(d.shape[0], k, d.shape[2], device=d.device).scatter_reduce(
        1, labels[..., None].expand_as(d), d, reduce="amax", include_self=False)
    counts = cluster_counts(labels, k) if counts is None else counts
    return torch.where(counts > 0, pooled.norm(dim=2), -1.0)


def _rank(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Sort key per row: primary (integer-valued) first, ties broken by secondary scaled into [0, 0.5)."""
    s = secondary.double()
    s = s / (s.amax(dim=-1, keepdim=True) * 2 + 1e-12) if s.numel() else s
    return primary.double() + s


def select_tokens(delta: torch.Tensor, labels: torch.Tensor, age: torch.Tensor, n_keep: int, balance: float,
                  first: bool) -> torch.Tensor:
    """Image tokens to compute (n_keep,), ascending, from delta (N, D) (noise change since the reference
    step) and age (N,) (steps since last computed); one row of select_tokens_batched."""
    k = int(labels.max()) + 1 if labels.numel() else 1
    return select_tokens_batched(delta.unsqueeze(0), labels.unsqueeze(0), age.unsqueeze(0), n_keep, balance, first,
                                 cluster_counts(labels.unsqueeze(0), k))[0]


def _order_within_clusters(key: torch.Tensor, labels: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(B, N): each token's place in its cluster by descending key (ties: lower index first)."""
    by_key = torch.argsort(key, dim=1, descending=True, stable=True)
    grouped = by_key.gather(1, torch.argsort(labels.gather(1, by_key), dim=1, stable=True))  # by cluster, then key
    place = torch.empty_like(grouped).scatter_(1, grouped, _positions(key.shape, key.device))
    return place - starts.gather(1, labels)


@functools.lru_cache(maxsize=16)
def _positions(shape: tuple, device) -> torch.Tensor:
    return torch.arange(shape[1], device=device).expand(shape)


@functools.lru_cache(maxsize=16)
def _quota_multipliers(k: int, device) -> torch.Tensor:
    """(k,) quota multiplier of the cluster at each score rank."""
    mult = [TOP_CLUSTER_QUOTA[i] if i < len(TOP_CLUSTER_QUOTA) else 1 for i in range(k)]
    return torch.tensor(mult, dtype=torch.long).to(device)


def select_tokens_batched(delta: torch.Tensor, labels: torch.Tensor, age: torch.Tensor, n_keep: int,
                          balance: float, first, counts: torch.Tensor) -> torch.Tensor:
    """select_tokens for every row without a device sync: (B, n_keep) ascending indices.

    `first`: a bool or one per row. The noise share goes cluster by cluster in score order: the
    cluster's quota of most-changed tokens, then (after the first pruned step, below the top cluster)
    half a quota of its stalest, then the most-changed of the rest. The balance share is the stalest of
    the others. Ties go to the lower token index.
    """
    b, n = labels.shape
    k = counts.shape[1]
    n_keep = max(0, min(n_keep, n))
    if n_keep == n:
        return _positions((b, n), delta.device)
    mag = delta.float().norm(dim=2)
    n_stale = max(1, int(round(balance * n_keep))) if n_keep else 0
    n_noise = n_keep - n_stale
    stale_key = _rank(age, mag)
    picked = []
    if n_noise > 0:
        order = torch.argsort(cluster_scores(delta, labels, k, counts), dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, _positions((b, k), delta.device))  # cluster -> rank
        quota = max(1, int(BASE_QUOTA * n_keep))
        cluster_quota = torch.minimum(quota * _quota_multipliers(k, delta.device)[rank], counts)  # (B, k)
        starts = counts.cumsum(1) - counts
        token_rank, token_quota = rank.gather(1, labels), cluster_quota.gather(1, labels)
        place = _order_within_clusters(mag, labels, starts)
        # Sequence key: cluster rank, then the changed tokens, then the stale ones; the rest by change.
        key = torch.where(place < token_quota, token_rank * (2 * n) + place, 2 * n * k + place)
        if not (first is True or (not isinstance(first, bool) and all(first))):
            stale_place = _order_within_clusters(stale_key, labels, starts)
            stale = (stale_place < token_quota // 2) & (token_rank > 0) & (key >= 2 * n * k)
            if not isinstance(first, bool):
                stale &= ~torch.tensor(list(first), device=delta.device)[:, None]
            key = torch.where(stale, token_rank * (2 * n) + n + stale_place, key)
        # past every candidate: the most-changed tokens, in order
        by_change = torch.empty_like(place).scatter_(1, torch.argsort(mag, dim=1, descending=True, stable=True),
                                                     _positions((b, n), delta.device))
        key = torch.where(key >= 2 * n * k, 2 * n * k + by_change, key)
        noise_idx = torch.topk(key, n_noise, dim=1, largest=False).indices
        picked.append(noise_idx)
        stale_key = stale_key.scatter(1, noise_idx, -1.0)
    if n_stale > 0:
        picked.append(torch.topk(stale_key, n_stale, dim=1).indices)
    return torch.cat(picked, dim=1).sort(dim=1).values


def staleness_bound(n: int, n_keep: int, balance: float) -> int:
    """Max steps between two computations of any token in the pruned phase."""
    n_stale = max(1, int(round(balance * n_keep)))
    return (n - 1) // n_stale + 1


def patchify(noise: torch.Tensor, grid, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*p*p) on the token grid, padded as the model pads; (B, C, T, H, W) gives
    tokens in (t, h, w) raster order, time patched by 1."""
    if noise.ndim == 5:
        b, c, t, h, w = noise.shape
        frames = patchify(noise.transpose(1, 2).reshape(b * t, c, h, w), grid[-2:], patch)
        return frames.reshape(b, t * frames.shape[1], frames.shape[2])
    b, c, h, w = noise.shape
    gh, gw = grid
    x = F.pad(noise, (0, gw * patch - w, 0, gh * patch - h))
    x = x.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, gh * gw, c * patch * patch)


def unpatchify(tokens: torch.Tensor, shape, patch: int) -> torch.Tensor:
    """Inverse of patchify, cropped to shape (B, C, H, W) or (B, C, T, H, W)."""
    if len(shape) == 5:
        b, c, t, h, w = shape
        frames = unpatchify(tokens.reshape(b * t, -1, tokens.shape[2]), (b * t, c, h, w), patch)
        return frames.reshape(b, t, c, h, w).transpose(1, 2)
    b, c, h, w = shape
    gh, gw = math.ceil(h / patch), math.ceil(w / patch)
    x = tokens.reshape(b, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, gh * patch, gw * patch)[:, :, :h, :w]


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


@dataclass
class CATRunState:
    """Everything CAT keeps during one sampling run; `clear()` frees it."""

    rows: dict = field(default_factory=dict)
    kv: dict = field(default_factory=dict)   # call signature -> {(block, attention call): K/V tensors}
    latent: tuple | None = None
    steps: StepCounter = field(default_factory=StepCounter)
    call: CallPlan | None = None
    peak_cache_bytes: int = 0

    def clear(self):
        self.rows.clear()
        self.kv.clear()
        self.latent = None
        self.steps = StepCounter()
        self.call = None

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
    """Per model call: full or pruned, and which image tokens each row computes."""

    name = "CAT Pruning"
    composable = False  # its block runner gathers tokens; other token-reduction patches cannot nest

    def __init__(self, config: CATConfig, schedule: TokenRatioSchedule | None = None):
        self.config = config.validate()
        self.schedule = schedule

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

    def begin_call(self, state: CATRunState, call, x: torch.Tensor) -> CallPlan:
        """Decide full or pruned for this call; resets the state on a new run or a new latent."""
        sigma = float(call.sigma)
        latent = (tuple(x.shape[1:]), x.dtype, x.device, tuple(call.grid))
        if state.latent != latent or state.steps.starts_new_run(sigma):
            state.clear()  # new latent (shape, dtype, device) or sigma went up: a new run
            state.latent = latent
        state.steps.count(sigma)
        if not self.is_active(call.progress) or len(call.grid) not in (2, 3):
            state.steps.last_full = True
            state.call = None  # outside the window: the unpatched model, nothing recorded
            return None
        rows = call_rows(call, x.shape[0])
        signature = (rows, x.shape[0])
        n_keep = self.n_keep(call.n_img, call.progress, call.num_blocks)
        full = (self._scheduled_full(call.progress, n_keep, call.n_img, state.steps.reduced_since_full)
                or any(state.rows.get(r) is None or state.rows[r].prev is None for r in rows)
                or signature not in state.kv)
        selection = None
        if not full:
            selection = self._select([state.rows[r] for r in rows], call.grid, n_keep)
            selection = selection if selection.device == x.device else selection.to(x.device)
        state.steps.last_full = full
        state.call = CallPlan(rows, selection, signature)
        return state.call

    def _scheduled_full(self, progress: float, n_keep: int, n_img: int, pruned_since_full: int) -> bool:
        c = self.config
        return (progress < c.full_percent or n_keep >= n_img
                or (c.refresh_every > 0 and pruned_since_full >= c.refresh_every))

    def step_plan(self, progresses, n_img: int, num_blocks: int = 1) -> list:
        """Image tokens computed per step for these progress values, as begin_call would decide them."""
        out, pruned_since_full, history = [], 0, False
        for p in progresses:
            if not self.is_active(p):
                out.append(n_img)
                pruned_since_full, history = 0, False
                continue
            n_keep = self.n_keep(n_img, p, num_blocks)
            full = not history or self._scheduled_full(p, n_keep, n_img, pruned_since_full)
            out.append(n_img if full else n_keep)
            pruned_since_full = 0 if full else pruned_since_full + 1
            history = True
        return out

    def _select(self, rows: list, grid, n_keep: int) -> torch.Tensor:
        """(B, n_keep) tokens to compute, one row per RowState, chosen for all rows at once."""
        c = self.config
        first = tuple(row.ref is None for row in rows)
        new = [row for row in rows if row.labels is None]
        if new:  # clusters once per run, at the first pruned step
            prev = torch.stack([row.prev for row in new])
            k = min(c.clusters, prev.shape[1])
            labels = kmeans_labels_batched(prev, grid, c.clusters, seed=c.seed)
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

    def end_call(self, state: CATRunState, call, noise: torch.Tensor):
        """Record this call's noise (B, C, H, W). Returns (noise with the others' cached noise carried to
        this sigma, computed pixel mask), or None when all were computed."""
        plan = state.call
        state.call = None
        if plan is None:
            return None
        grid, patch = call.grid, call.patch
        tokens = patchify(noise.float(), grid, patch)  # a fresh tensor: rows keep views of it
        sigma = state.steps.last_sigma
        replaced = None
        if plan.selection is not None and call.reduced:  # some block pruned (a block may run unreduced)
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
        plan = state.call if state is not None else None
        if plan is None:
            block.count(block.span.n_img)
            return block.original(block.args)
        store = state.kv.setdefault(plan.signature, {}).setdefault(block.spec.index, {})
        selection = plan.selection
        if selection is not None and selection.shape[0] != block.args["img"].shape[0]:
            selection = None  # the block sees another batch than the call (should not happen)
        if selection is not None and not store:
            selection = None  # no cached keys/values for this block yet: compute it in full
        block.count(block.span.n_img if selection is None else selection.shape[1], block.span.n_img)
        block.call.reduced = block.call.reduced or selection is not None
        if observing():  # 1 = computed, 0 = served from cache
            x = block.args["img"]
            computed = torch.ones(x.shape[0], block.span.n_img, device=x.device)
            if selection is not None:
                computed = torch.zeros_like(computed).scatter_(1, selection, 1.0)
            report_computed(block.spec.index, computed)
        return run_block_pruned(block.args, block.original, block.span, block.family, selection, store,
                                block.call.shared, block.pieces(), self.config.cache_dtype == "fp8")


# ---- block runner ---------------------------------------------------------------------------------

def run_block_pruned(args: dict, original_block, span, family, selection: torch.Tensor | None,
                     kv_store: dict, shared=None, pieces=None, fp8: bool = False) -> dict:
    """Run a block on a subset of image tokens, with cached keys/values for the others.

    selection None: every token runs and refills `kv_store` ({call ordinal: {"k", "v", "start"}}).
    selection (B, k): only those image tokens (and every text token) run, against every image key;
    the others leave the block unchanged. `fp8`: the store holds float8 keys/values.
    """
    x = args["img"]
    a = span.img_start
    new_args = dict(args)
    if selection is not None:
        bsz, k = selection.shape
        before, main, after = pieces if pieces is not None else split_tokens(x, a, span.n_img)
        new_args["img"] = join_tokens(before, take_rows(main, selection, 1), after)
        if span.pe_dim is not None:
            pe, d = args["pe"], span.pe_dim

            def selected_pe():
                return with_image_pe(pe, span, family, bsz, lambda t: take_rows(t, selection, d), shared)

            new_args["pe"] = selected_pe() if shared is None else shared.get(("selected pe", d, span.key_offset),
                                                                              (pe, selection), selected_pe)
        vec = args.get("vec")
        if per_token_vec(vec, x):  # the selected tokens keep their own modulation
            new_args["vec"] = torch.cat([vec[:, :a], take_rows(vec[:, a:a + span.n_img], selection, 1),
                                         vec[:, a + span.n_img:]], dim=1)
    captured: list = []
    new_args["transformer_options"] = override_attention(
        args.get("transformer_options") or {},
        _cached_kv_hook(kv_store, span.key_offset, span.n_img, selection, shared, captured, fp8),
        first_call_only=span.cross_attention)
    out = original_block(new_args)
    if selection is None:
        _store_kv(kv_store, captured, fp8)
        return out
    y_before, y_sel, y_after = split_tokens(out["img"], a, k)
    idx = _expanded(shared, selection, 1, (bsz, k, main.shape[2]))
    out = dict(out)
    out["img"] = join_tokens(y_before, main.scatter(1, idx, y_sel if y_sel.dtype == main.dtype else
                                                    y_sel.to(main.dtype)), y_after)
    return out


def _expanded(shared, selection: torch.Tensor, dim: int, shape: tuple) -> torch.Tensor:
    """The selection (B, k) as a scatter index of `shape`, k along `dim`; once per call and shape."""
    def make():
        view = [selection.shape[0]] + [1] * (len(shape) - 1)
        view[dim] = selection.shape[1]
        return selection.view(*view).expand(*shape)

    return make() if shared is None else shared.get(("selection index", dim, shape), (selection,), make)


def quantize_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn bits as uint8, float32 scale per last-axis vector). uint8 because scatter has no
    float8 kernel."""
    scale = t.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (t.float() / scale).to(FP8).view(torch.uint8), scale


def dequantize_fp8(bits: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    return (bits.view(FP8).float() * scale).to(dtype)


def _store_kv(kv_store: dict, captured: list, fp8: bool = False):
    """Store a full block's captured image keys/values, in place when the layout is unchanged."""
    for ordinal, start, kk, vv in captured:
        new = {"start": start}
        for name, t in (("k", kk), ("v", vv)):
            if fp8:
                new[name], new[name + "_scale"] = quantize_fp8(t)
            else:
                new[name] = t
        entry = kv_store.get(ordinal)
        if entry is not None and entry.keys() == new.keys() and all(
                entry[n].shape == new[n].shape and entry[n].dtype == new[n].dtype and entry[n].device == new[n].device
                for n in new if n != "start"):
            for n in new:
                if n == "start":
                    entry[n] = start
                else:
                    entry[n].copy_(new[n])
        else:
            kv_store[ordinal] = {n: (t if n == "start" or fp8 else t.clone()) for n, t in new.items()}


def _cached_kv_hook(kv_store: dict, offset: int, n_img: int, selection, shared=None, captured: list | None = None,
                    fp8: bool = False):
    """Attention hook that captures (selection None) or completes (selection) the image keys/values,
    per call ordinal. The caller stores `captured` after the block, so a compiled block never writes or
    branches on the store. Selected tokens attend with their exact fresh keys/values."""
    def hook(ordinal, args, kwargs):
        q, k, v = args[0], args[1], args[2]
        seq = seq_dim(kwargs)
        n_keys = k.shape[seq]
        if selection is None:
            start = image_key_start(n_keys, offset, n_img)
            if start is not None and captured is not None:
                captured.append((ordinal, start) + tuple(split_tokens(t, start, n_img, seq)[1] for t in (k, v)))
            return args, kwargs
        entry = kv_store.get(ordinal)
        n_sel = selection.shape[1]
        if entry is not None and n_keys >= entry["start"] + n_sel:
            start = entry["start"]
            full = []
            for name, t in (("k", k), ("v", v)):  # v may have another layout than k (SD3: B, L, H, D)
                before, fresh, after = split_tokens(t, start, n_sel, seq)
                idx = _expanded(shared, selection, seq, tuple(fresh.shape))
                cache = entry[name]
                if fp8:
                    image = dequantize_fp8(cache, entry[name + "_scale"], t.dtype).scatter_(seq, idx, fresh)
                    bits, scale = quantize_fp8(fresh)
                    cache.scatter_(seq, idx, bits)
                    entry[name + "_scale"].scatter_(seq, _expanded(shared, selection, seq, tuple(scale.shape)), scale)
                else:
                    cache.scatter_(seq, idx, fresh if fresh.dtype == cache.dtype else fresh.to(cache.dtype))
                    image = cache if cache.dtype == t.dtype else cache.to(t.dtype)
                full.append(join_tokens(before, image, after, seq))
            args = (q, full[0], full[1]) + tuple(args[3:])
        return args, kwargs

    return hook

"""CAT Pruning: cluster-aware cached token pruning (arXiv 2502.00433), host-independent.

After the first steps, a pruned step computes only the image tokens whose predicted noise changed
most (cluster by cluster) plus the least recently computed ones; the others keep their cached keys,
values and noise, the noise moved along its trend between the last two full steps (a forecast the
paper does not have). A full refresh step follows every `refresh_every` pruned steps. How it works,
its measured defaults and its departures from the paper's code: docs/cat.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import image_key_start, override_attention, seq_dim
from .families import per_token_vec, with_image_pe
from .runtime import BlockCall, TokenMethod, call_rows, check_fractions, observing, report_computed
from .schedule import TokenRatioSchedule, block_depth

TOP_CLUSTER_QUOTA = (3, 2, 1)  # quota multipliers of the three highest-scoring clusters
BASE_QUOTA = 0.05              # base per-cluster quota, as a fraction of the kept tokens
POSITION_WEIGHT_NOISE = 0.05   # clustering feature = 0.05 x noise + position
KMEANS_ITERS = 10


@dataclass(frozen=True)
class CATConfig:
    ratio: float = 0.95         # fraction of image tokens pruned (not computed) per pruned step (paper: 0.7)
    full_percent: float = 0.28  # progress before which every step runs in full (8 of 28 steps, the paper's t0)
    refresh_every: int = 2      # a full step after this many pruned steps (0: never, as the paper)
    clusters: int = 20
    balance: float = 0.75       # fraction of kept tokens chosen as the least recently computed
    forecast: float = 0.5       # damping of the first-order forecast of cached noise (0: plain reuse, the paper)
    start_percent: float = 0.0
    end_percent: float = 1.0
    seed: int = 0

    def validate(self) -> "CATConfig":
        if not (0.0 <= self.ratio < 1.0):
            raise ValueError(f"CAT Pruning: ratio must lie in [0, 1), got {self.ratio}")
        check_fractions("CAT Pruning", self, "full_percent", "start_percent", "end_percent", "balance", "forecast")
        if self.clusters < 1:
            raise ValueError(f"CAT Pruning: clusters must be >= 1, got {self.clusters}")
        if self.refresh_every < 0:
            raise ValueError(f"CAT Pruning: refresh_every must be >= 0, got {self.refresh_every}")
        return self


def along_trend(noise: torch.Tensor, from_sigma: float, sigma: float, slope: torch.Tensor,
                damping: float) -> torch.Tensor:
    """`noise` (predicted at `from_sigma`) moved to `sigma` along `slope` (d noise / d sigma), damped."""
    return noise + (damping * (sigma - from_sigma)) * slope


# The paper's schedule (t0 = 8 of 28 steps, no refresh, no forecast), a comparison row in the evidence.
PAPER_SETTING = dict(ratio=0.7, full_percent=0.28, refresh_every=0, forecast=0.0)
# The faster preset: the layout steps run in full for less of the progress.
FAST_SETTING = dict(full_percent=0.18)
# The node's named settings; "balanced" is CATConfig's defaults. Each is measured in docs/evidence.md.
PRESETS = {
    "quality": dict(refresh_every=1),
    "balanced": {},
    "fast": FAST_SETTING,
}
# Settings a connected TokenRatioSchedule replaces (CATPruning.ratio reads the schedule instead).
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
    """Cluster label (N,) per token: Lloyd's k-means on 0.05 x noise + position, seeded init."""
    n = noise.shape[0]
    if k >= n:
        return torch.arange(n, device=noise.device)
    feats = POSITION_WEIGHT_NOISE * noise.float() + position_features(grid, noise.shape[1], noise.device)
    gen = torch.Generator().manual_seed(seed)
    centres = feats[torch.randperm(n, generator=gen)[:k].to(noise.device)].clone()
    labels = None
    for _ in range(iters):
        dist = (feats[:, None, :] - centres[None]).pow(2).sum(-1)
        new = dist.argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centres).index_add_(0, labels, feats)
        counts = torch.bincount(labels, minlength=k).to(feats.dtype)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]  # empty clusters keep their centre
    return labels


def cluster_scores(delta: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) norm of each cluster's element-wise max |delta|; empty clusters score -1."""
    d = delta.abs().float()
    pooled = torch.zeros(k, d.shape[1], device=d.device).scatter_reduce(
        0, labels[:, None].expand_as(d), d, reduce="amax", include_self=False)
    scores = pooled.norm(dim=1)
    scores[torch.bincount(labels, minlength=k) == 0] = -1.0
    return scores


def _rank(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Sort key: primary (integer-valued) first, ties broken by secondary scaled into [0, 0.5)."""
    s = secondary.double()
    s = s / (s.max() * 2 + 1e-12) if s.numel() else s
    return primary.double() + s


def select_tokens(delta: torch.Tensor, labels: torch.Tensor, age: torch.Tensor, n_keep: int, balance: float,
                  first: bool) -> torch.Tensor:
    """Indices (n_keep,) of the image tokens to compute, ascending and distinct.

    delta: (N, D) noise change since the reference step; labels: (N,) clusters; age: (N,) steps
    since each token was last computed; `first`: the first pruned step of the run.
    """
    n = delta.shape[0]
    n_keep = max(0, min(n_keep, n))
    if n_keep == n:
        return torch.arange(n, device=delta.device)
    mag = delta.float().norm(dim=1)
    n_stale = max(1, int(round(balance * n_keep))) if n_keep else 0
    n_noise = n_keep - n_stale
    chosen = torch.zeros(n, dtype=torch.bool, device=delta.device)
    picked: list[torch.Tensor] = []
    count = 0
    if n_noise > 0:
        k = int(labels.max()) + 1
        order = torch.argsort(cluster_scores(delta, labels, k), descending=True, stable=True)
        quota = max(1, int(BASE_QUOTA * n_keep))
        stale_key = _rank(age, mag)
        for i, c in enumerate(order.tolist()):
            members = (labels == c).nonzero().flatten()
            if members.numel() == 0:
                continue
            q = min(quota * (TOP_CLUSTER_QUOTA[i] if i < len(TOP_CLUSTER_QUOTA) else 1), members.numel())
            take = [members[torch.topk(mag[members], q).indices]]
            if not first and i != 0 and q // 2 > 0:  # the cluster's least recently computed tokens
                take.append(members[torch.topk(stale_key[members], q // 2).indices])
            for t in take:
                t = t[~chosen[t]]
                t = t[: n_noise - count]
                chosen[t] = True
                picked.append(t)
                count += t.numel()
            if count >= n_noise:
                break
        if count < n_noise:  # clusters exhausted: the largest remaining changes
            rest = torch.where(chosen, torch.full_like(mag, -1.0), mag)
            t = torch.topk(rest, n_noise - count).indices
            chosen[t] = True
            count += t.numel()
    # Distribution balance: the rest goes to the least recently computed tokens.
    key = _rank(age, mag)
    key[chosen] = -1.0
    t = torch.topk(key, n_keep - count).indices
    chosen[t] = True
    return chosen.nonzero().flatten()


def staleness_bound(n: int, n_keep: int, balance: float) -> int:
    """Max steps between two computations of any token in the pruned phase."""
    n_stale = max(1, int(round(balance * n_keep)))
    return (n - 1) // n_stale + 1


def patchify(noise: torch.Tensor, grid, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*p*p) on the token grid (the model pads the latent the same way).
    Video / 5-D latents (B, C, T, H, W), time patched by 1 (Wan, Qwen-Image): tokens in (t, h, w)
    raster order, as those models flatten them."""
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
    age: torch.Tensor | None = None     # steps since each token was last computed (N,)
    sigma: float | None = None          # sigma of the step `prev` belongs to
    full: torch.Tensor | None = None    # noise of the last full step (N, D)
    full_sigma: float | None = None
    full_steps: int = 0                 # full steps seen (the first never starts a slope)
    slope: torch.Tensor | None = None   # d noise / d sigma between the last two full steps (N, D)
    trend_ok: bool = True               # the last check: the trend predicted a full step better than holding


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
    last_sigma: float | None = None
    last_full: bool = True
    pruned_since_full: int = 0
    call: CallPlan | None = None
    peak_cache_bytes: int = 0

    def clear(self):
        self.rows.clear()
        self.kv.clear()
        self.latent = None
        self.last_sigma = None
        self.last_full = True
        self.pruned_since_full = 0
        self.call = None

    def cache_bytes(self) -> int:
        total = 0
        for per_block in self.kv.values():
            for per_call in per_block.values():
                for entry in per_call.values():
                    total += sum(t.numel() * t.element_size() for t in entry.values() if isinstance(t, torch.Tensor))
        for r in self.rows.values():
            for t in (r.prev, r.before, r.ref, r.labels, r.age, r.full, r.slope):
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
        """Fraction pruned at `progress` (a schedule is averaged over the model's block depths)."""
        if self.schedule is None:
            return self.config.ratio
        vals = [self.schedule.ratio(block_depth(i, num_blocks), progress) for i in range(num_blocks)]
        return min(max(sum(vals) / len(vals), 0.0), 0.99)

    def n_keep(self, n_img: int, progress: float, num_blocks: int = 1) -> int:
        return n_img - int(self.ratio(progress, num_blocks) * n_img)

    def begin_call(self, state: CATRunState, call, x: torch.Tensor) -> CallPlan:
        """Decide full or pruned for this call; resets the state on a new run or a new latent."""
        sigma = float(call.sigma)
        latent = (tuple(x.shape[1:]), x.dtype, x.device, tuple(call.grid))
        if state.latent != latent or (state.last_sigma is not None and sigma > state.last_sigma + 1e-9):
            state.clear()  # new latent (shape, dtype, device) or sigma went up: a new run
            state.latent = latent
        if state.last_sigma is not None and sigma != state.last_sigma:  # a new step
            state.pruned_since_full = 0 if state.last_full else state.pruned_since_full + 1
        state.last_sigma = sigma
        if not self.is_active(call.progress) or len(call.grid) not in (2, 3):
            state.last_full = True
            state.call = None  # outside the window: the unpatched model, nothing recorded
            return None
        rows = call_rows(call, x.shape[0])
        signature = (rows, x.shape[0])
        n_keep = self.n_keep(call.n_img, call.progress, call.num_blocks)
        full = (self._scheduled_full(call.progress, n_keep, call.n_img, state.pruned_since_full)
                or any(state.rows.get(r) is None or state.rows[r].prev is None for r in rows)
                or signature not in state.kv)
        selection = None
        if not full:
            selection = torch.stack([self._select(state.rows[r], call.grid, n_keep) for r in rows]).to(x.device)
        state.last_full = full
        state.call = CallPlan(rows, selection, signature)
        return state.call

    def _scheduled_full(self, progress: float, n_keep: int, n_img: int, pruned_since_full: int) -> bool:
        c = self.config
        return (progress < c.full_percent or n_keep >= n_img
                or (c.refresh_every > 0 and pruned_since_full >= c.refresh_every))

    def step_plan(self, progresses, n_img: int, num_blocks: int = 1) -> list:
        """Image tokens computed per step (n_img for a full step) for a schedule's progress values,
        as begin_call decides them in a run (the first active step has no history: full)."""
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

    def _select(self, row: RowState, grid, n_keep: int) -> torch.Tensor:
        c = self.config
        first = row.ref is None
        if first:
            row.ref = row.before if row.before is not None else row.prev
            row.labels = kmeans_labels(row.prev, grid, c.clusters, seed=c.seed)
        return select_tokens(row.prev - row.ref, row.labels, row.age, n_keep, c.balance, first)

    def _forecast(self, row: RowState, sigma: float) -> torch.Tensor:
        """The row's cached noise carried from its last step to `sigma`, while the trend holds."""
        if row.slope is None or not row.trend_ok or self.config.forecast == 0.0:
            return row.prev
        return along_trend(row.prev, row.sigma, sigma, row.slope, self.config.forecast)

    def end_call(self, state: CATRunState, call, noise: torch.Tensor):
        """Record this call's predicted noise (B, C, H, W). Returns (noise with non-computed tokens
        replaced by their cached noise, forecast to this sigma; pixel mask of computed tokens) or None
        when all were computed."""
        plan = state.call
        state.call = None
        if plan is None:
            return None
        grid, patch = call.grid, call.patch
        tokens = patchify(noise.float(), grid, patch)
        sigma = state.last_sigma
        replaced = None
        if plan.selection is not None:
            keep = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            keep.scatter_(1, plan.selection, True)
            cached = torch.stack([self._forecast(state.rows[r], sigma).to(tokens.device) for r in plan.rows])
            replaced = torch.where(keep[..., None], tokens, cached)
        for i, key in enumerate(plan.rows):
            row = state.rows.setdefault(key, RowState())
            if plan.selection is None:
                if row.sigma != sigma:
                    row.before = row.prev
                if row.full_sigma != sigma:
                    if row.slope is not None:  # would the trend have predicted this step better than holding?
                        guess = along_trend(row.full, row.full_sigma, sigma, row.slope, self.config.forecast)
                        row.trend_ok = bool((guess - tokens[i]).norm() < (row.full - tokens[i]).norm())
                    if row.full_steps >= 2:
                        row.slope = (tokens[i] - row.full) / (sigma - row.full_sigma)
                    row.full_steps += 1
                # one copy serves as both: `prev` is replaced, never written in place
                row.prev = row.full = tokens[i].clone()
                row.full_sigma = sigma
                row.age = torch.zeros(tokens.shape[1], dtype=torch.long, device=tokens.device)
            else:
                row.prev = replaced[i].clone()
                row.age += 1
                row.age[plan.selection[i]] = 0
            row.sigma = sigma
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
        if observing():  # 1 = computed, 0 = served from cache
            x = block.args["img"]
            computed = torch.ones(x.shape[0], block.span.n_img, device=x.device)
            if selection is not None:
                computed = torch.zeros_like(computed).scatter_(1, selection, 1.0)
            report_computed(block.spec.index, computed)
        return run_block_pruned(block.args, block.original, block.span, block.family, selection, store)


# ---- block runner ---------------------------------------------------------------------------------

def run_block_pruned(args: dict, original_block, span, family, selection: torch.Tensor | None,
                     kv_store: dict) -> dict:
    """Run a block on a subset of image tokens, with cached keys/values for the others.

    selection None: every token runs and the image keys/values of each attention call are stored in
    `kv_store` ({attention call ordinal: {"k", "v", "start"}}). selection (B, k): only those image
    tokens run as queries (text and reference tokens always run); their fresh keys/values go into the
    cache, and attention sees every image token's key and value. Other tokens leave the block unchanged.
    """
    x = args["img"]
    a, b = span.img_start, span.img_start + span.n_img
    new_args = dict(args)
    if selection is not None:
        bsz, k = selection.shape
        main = x[:, a:b]
        idx = selection[:, :, None].expand(bsz, k, x.shape[2])
        new_args["img"] = torch.cat([x[:, :a], main.gather(1, idx), x[:, b:]], dim=1)
        if span.pe_dim is not None:
            pe, d = args["pe"], span.pe_dim
            view = [bsz] + [1] * (pe.ndim - 1)
            view[d] = k
            pidx = selection.view(*view).expand(*(bsz,) + pe.shape[1:d], k, *pe.shape[d + 1:])
            new_args["pe"] = with_image_pe(pe, span, family, bsz, lambda t: t.gather(d, pidx))
        vec = args.get("vec")
        if per_token_vec(vec, x):  # the selected tokens keep their own modulation
            vidx = selection.view(bsz, k, *([1] * (vec.ndim - 2))).expand(bsz, k, *vec.shape[2:])
            new_args["vec"] = torch.cat([vec[:, :a], vec[:, a:b].gather(1, vidx), vec[:, b:]], dim=1)
    new_args["transformer_options"] = override_attention(
        args.get("transformer_options") or {}, _cached_kv_hook(kv_store, span.key_offset, span.n_img, selection),
        first_call_only=span.cross_attention)
    out = original_block(new_args)
    if selection is None:
        return out
    y = out["img"]
    restored = main.scatter(1, idx, y[:, a:a + k].to(main.dtype))
    out = dict(out)
    out["img"] = torch.cat([y[:, :a], restored, y[:, a + k:]], dim=1)
    return out


def _cached_kv_hook(kv_store: dict, offset: int, n_img: int, selection):
    """Attention hook that stores (selection None) or completes (selection) the image keys/values.

    Joint attention sees [text, image(, reference)] keys, the image at `offset`; image-only attention
    (SD3.5's second attention) sees the image alone. Calls are told apart by their order in the block.
    """
    def hook(ordinal, args, kwargs):
        q, k, v = args[0], args[1], args[2]
        seq = seq_dim(kwargs)
        n_keys = k.shape[seq]
        if selection is None:
            start = image_key_start(n_keys, offset, n_img)
            if start is not None:
                entry = kv_store.get(ordinal)
                kk, vv = k.narrow(seq, start, n_img), v.narrow(seq, start, n_img)
                if entry is not None and entry["k"].shape == kk.shape and entry["k"].dtype == kk.dtype \
                        and entry["k"].device == kk.device:
                    entry["k"].copy_(kk)
                    entry["v"].copy_(vv)
                    entry["start"] = start
                else:
                    kv_store[ordinal] = {"k": kk.clone(), "v": vv.clone(), "start": start}
            return args, kwargs
        entry = kv_store.get(ordinal)
        n_sel = selection.shape[1]
        if entry is not None and n_keys >= entry["start"] + n_sel:
            start = entry["start"]
            for name, t in (("k", k), ("v", v)):  # v may have another layout than k (SD3: B, L, H, D)
                fresh = t.narrow(seq, start, n_sel)
                view = [selection.shape[0]] + [1] * (t.ndim - 1)
                view[seq] = n_sel
                entry[name].scatter_(seq, selection.view(*view).expand(*fresh.shape), fresh.to(entry[name].dtype))
            end = start + n_sel
            k = torch.cat([k.narrow(seq, 0, start), entry["k"].to(k.dtype), k.narrow(seq, end, n_keys - end)], dim=seq)
            v = torch.cat([v.narrow(seq, 0, start), entry["v"].to(v.dtype), v.narrow(seq, end, n_keys - end)], dim=seq)
            args = (q, k, v) + tuple(args[3:])
        return args, kwargs

    return hook

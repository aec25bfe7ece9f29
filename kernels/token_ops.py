"""Host-independent token operations: merge plans, merge/unmerge, grid-aware matching.

A merge plan maps N tokens onto M <= N slots; a slot is the mean of its group, and unmerge copies it
back to every member. Everything is batched over dim 0, keeps dtype and device, and never loops over tokens.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


class MergePlan:
    """Token -> slot assignment for one batch; derived views are cached for every block sharing the plan.

    assign: (B, N) slot of every token. rep: (B, M) the token whose position each slot keeps.
    sizes: (B, M) float32 group sizes, or `sizes_col` (B, M, 1).
    """

    def __init__(self, assign: torch.Tensor, rep: torch.Tensor, sizes: torch.Tensor | None = None,
                 sizes_col: torch.Tensor | None = None, assign_col: torch.Tensor | None = None):
        if sizes is None and sizes_col is None:
            raise ValueError("MergePlan needs sizes or sizes_col")
        # assign / rep may come in row layout (B, 1, N) / (B, 1, M), as the rotary gather wants them.
        self._assign, self._rep = assign, rep
        self._sizes, self._sizes_col, self._assign_col = sizes, sizes_col, assign_col
        self._index: dict = {}
        self._log_sizes = None

    @property
    def assign(self) -> torch.Tensor:
        if self._assign.ndim == 3:
            self._assign = self._assign.squeeze(1)
        return self._assign

    @property
    def rep(self) -> torch.Tensor:
        if self._rep.ndim == 3:
            self._rep = self._rep.squeeze(1)
        return self._rep

    def __repr__(self) -> str:
        return f"MergePlan(batch={self.assign.shape[0]}, n_in={self.n_in}, n_out={self.n_out})"

    @property
    def n_in(self) -> int:
        return self._assign.shape[-1]

    @property
    def n_out(self) -> int:
        return self._rep.shape[-1]

    @property
    def sizes(self) -> torch.Tensor:
        if self._sizes is None:
            self._sizes = self._sizes_col.squeeze(-1)
        return self._sizes

    @property
    def sizes_col(self) -> torch.Tensor:
        if self._sizes_col is None:
            self._sizes_col = self._sizes.unsqueeze(-1)
        return self._sizes_col

    def log_sizes(self, as_keys: bool = False) -> torch.Tensor:
        """(B, M) log group sizes, proportional attention's key bias; `as_keys`: (B, 1, 1, M), a key mask."""
        if self._log_sizes is None:
            b, m = self._rep.shape[0], self.n_out
            self._log_sizes = self.sizes_col.view(b, 1, 1, m).log()
        return self._log_sizes if as_keys else self._log_sizes.view(self._log_sizes.shape[0], -1)

    def index(self, c: int) -> torch.Tensor:
        """(B, N, c) slot index of every token over c channels (merge's scatter, unmerge's gather)."""
        idx = self._index.get(c)
        if idx is None:
            if self._assign_col is None:
                self._assign_col = self.assign.unsqueeze(-1)
            idx = self._index[c] = self._assign_col.expand(-1, -1, c)
        return idx

    def expand(self, batch: int) -> "MergePlan":
        """This batch-1 plan for `batch` rows (views, no copy)."""
        if self.assign.shape[0] == batch:
            return self
        return MergePlan(self.assign.expand(batch, -1), self.rep.expand(batch, -1),
                         sizes_col=self.sizes_col.expand(batch, -1, -1))

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, M, C): mean of each group, accumulated in float32."""
        b, _, c = x.shape
        acc = zeros_like_shape((b, self.n_out, c), torch.float32, x.device).scatter_add(
            1, self.index(c), x if x.dtype == torch.float32 else x.float())
        out = acc.div_(self.sizes_col)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, M, C) -> (B, N, C): every token receives its slot's value."""
        return torch.gather(y, 1, self.index(y.shape[-1]))

    def take_rep(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The representatives' entries of `t` (batch B or 1, N entries at `dim`), e.g. a rotary table."""
        return take_rows(t, self._rep, dim)


def take_rows(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """t[b, ..., idx[b, j], ...] along `dim` for idx (B, K) or (B, 1, .., K); `t` has batch B or 1.
    One advanced-indexing op that keeps t's layout."""
    if dim == 0:
        raise ValueError("take_rows indexes along a token axis after the batch axis")
    b, k = idx.shape[0], idx.shape[-1]
    lead = _lead_index(b, t.shape[0] == 1 and b > 1, tuple(t.shape[1:dim]), idx.device)
    if idx.ndim != dim + 1:  # (B, K) -> (B, 1, .., K)
        idx = idx.reshape(b, *([1] * (dim - 1)), k)
    return t[lead + (idx,)]


@functools.lru_cache(maxsize=64)
def _lead_index(batch: int, shared: bool, middle: tuple, device) -> tuple:
    """Broadcasting indices of the axes before take_rows' `dim` (batch row 0 when shared)."""
    d = len(middle) + 1
    rows = torch.zeros(batch, dtype=torch.long, device=device) if shared else torch.arange(batch, device=device)
    out = [rows.view(batch, *([1] * d))]
    for j, size in enumerate(middle, start=1):
        shape = [1] * (d + 1)
        shape[j] = size
        out.append(torch.arange(size, device=device).view(shape))
    return tuple(out)


@functools.lru_cache(maxsize=128)
def zeros_like_shape(shape: tuple, dtype, device) -> torch.Tensor:
    """A read-only expanded zero of `shape`: the input of an out-of-place scatter (one op, not zeros + scatter_)."""
    return _zero(dtype, device).expand(shape)


@functools.lru_cache(maxsize=16)
def _zero(dtype, device) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def _arange(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device)


@functools.lru_cache(maxsize=128)
def _slot_numbers(batch: int, m: int, device, row_layout: bool = False) -> torch.Tensor:
    """(B, m) or (B, 1, m): 1..m per row, the starter counts plan_from_targets searches for."""
    return torch.arange(1, m + 1, device=device).repeat(batch, *((1, 1) if row_layout else (1,)))


@functools.lru_cache(maxsize=32)
def _ones_col(batch: int, n: int, device) -> torch.Tensor:
    return torch.ones((), device=device).expand(batch, n, 1)


def plan_from_targets(target: torch.Tensor, m: int) -> MergePlan:
    """A plan from `target[b, n]` (or (B, 1, N)), the token that token n merges into.

    A token targeting itself starts a slot; others must target a starter (no chains). Every row has
    exactly `m` starters, passed in to avoid a device sync. Slots keep their starters' raster order.
    """
    b, n = target.shape[0], target.shape[-1]
    starter = target == _arange(n, target.device)
    count = starter.cumsum(-1)  # starters up to each token
    rep = torch.searchsorted(count, _slot_numbers(b, m, target.device, target.ndim == 3))  # count first reaches j
    assign = torch.searchsorted(rep, target)  # a target's place among the reps is its slot
    assign_col = assign.transpose(1, 2) if target.ndim == 3 else assign.unsqueeze(-1)
    sizes_col = zeros_like_shape((b, m, 1), torch.float32, target.device).scatter_add(
        1, assign_col, _ones_col(b, n, target.device))
    return MergePlan(assign, rep, sizes_col=sizes_col, assign_col=assign_col)


@functools.lru_cache(maxsize=64)
def window_layout(grid: tuple, window: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx (n_windows, K), border): each whole window's tokens in raster order, and the ragged-edge tokens
    outside every whole window (never merge destinations). Cached per grid: no per-step device sync."""
    if torch.device(device).type != "cpu":
        idx, border = window_layout(grid, window, torch.device("cpu"))
        return idx.to(device), border.to(device)
    grid = tuple(int(g) for g in grid)
    window = tuple(int(w) for w in window)
    if len(window) != len(grid):
        raise ValueError(f"window {window} and grid {grid} must have the same number of axes")
    full = torch.arange(_prod(grid), device=device).reshape(grid)
    counts = [g // w for g, w in zip(grid, window)]
    crop = full[tuple(slice(0, c * w) for c, w in zip(counts, window))]
    split = []
    for c, w in zip(counts, window):
        split += [c, w]
    crop = crop.reshape(split)
    d = len(grid)
    crop = crop.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2))
    idx = crop.reshape(_prod(counts), _prod(window))
    in_window = torch.zeros(_prod(grid), dtype=torch.bool, device=device)
    in_window[idx.reshape(-1)] = True
    # The border count is known on the host: a stable sort lists those tokens first, in order.
    n_border = _prod(grid) - idx.numel()
    border = torch.argsort(in_window.to(torch.uint8), stable=True)[:n_border]
    return idx, border


@functools.lru_cache(maxsize=64)
def window_tables(grid: tuple, window: tuple, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per grid: (idx_t (K, n_windows); token_window (1, N), n_windows for border tokens;
    token_window_any (1, N), border tokens sent to window 0 where they ignore the result)."""
    idx, _ = window_layout(grid, window, device)
    n_win, k = idx.shape
    n = _prod(grid)
    token_window = torch.full((n,), n_win, dtype=torch.long, device=device)
    token_window[idx.reshape(-1)] = torch.arange(n_win, device=device).unsqueeze(1).expand(n_win, k).reshape(-1)
    return idx.t().contiguous(), token_window.unsqueeze(0), token_window.clamp(max=max(n_win - 1, 0)).unsqueeze(0)


def window_reps(grid, window, seeds, device) -> tuple[torch.Tensor, ...]:
    """Per seed, (1, N): the token each token's window merges into (random_window_positions; border tokens
    get one they never use). One gather for all seeds."""
    idx_t, _, token_window_any = window_tables(tuple(grid), tuple(window), device)
    n_win, k = idx_t.shape[1], idx_t.shape[0]
    pos = torch.cat([random_window_positions(n_win, k, s, 1, device) for s in seeds])  # (S, n_win)
    reps = torch.gather(torch.gather(idx_t, 0, pos), 1, _expand_rows(token_window_any, len(seeds)))
    return reps.split(1)


@functools.lru_cache(maxsize=64)
def _expand_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.expand(rows, -1)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _normalized(metric: torch.Tensor) -> torch.Tensor:
    # Centre per channel first: DiT hidden states carry large shared channels
    # that would make every pair of tokens look alike.
    metric = metric - metric.mean(dim=1, keepdim=True)
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def random_window_positions(n_win: int, k: int, seed: int, batch: int, device) -> torch.Tensor:
    """Seeded per-window choice in [0, k), one draw for every batch row: a row's plan does not depend on
    whether ComfyUI batches cond and uncond together."""
    device = torch.device(device)
    if device.type == "meta":  # shape-only runs (FLOP counting)
        return torch.zeros(batch, n_win, dtype=torch.long, device=device)
    # On the tokens' device: a host-to-device copy would stall the queue once per block.
    gen = torch.Generator(device=device).manual_seed(int(seed) & 0x7FFFFFFF)
    pos = torch.randint(k, (1, n_win), generator=gen, device=device)
    return pos if batch == 1 else pos.expand(batch, n_win)


def window_merge_plan(metric: torch.Tensor, grid, window, num_remove: int, seed: int = 0,
                      reps: torch.Tensor | None = None) -> MergePlan | None:
    """Structure-stage merge: the most self-similar whole windows collapse into one token each.

    Score: mean pairwise cosine similarity, |sum of unit vectors|^2 / K^2 (no K x K matrix). The kept
    position is drawn per window from `seed`, or given as `reps` (window_reps).
    """
    b, n, _ = metric.shape
    grid, window = tuple(grid), tuple(window)
    idx, _ = window_layout(grid, window, metric.device)
    n_win, k = idx.shape
    n_sel = min(num_remove // max(k - 1, 1), n_win)
    if n_sel <= 0 or k < 2:
        return None
    unit = _normalized(metric if metric.dtype == torch.float32 else metric.float())
    score = unit[:, idx].sum(2).pow(2).sum(-1)  # (B, n_win), proportional to mean pair similarity
    chosen = score.topk(n_sel, dim=1).indices  # (B, n_sel)
    if reps is None:
        reps = window_reps(grid, window, [seed], metric.device)[0]
    _, token_window, _ = window_tables(grid, window, metric.device)
    merged = zeros_like_shape((b, n_win + 1), torch.bool, metric.device).scatter(1, chosen, True)
    target = torch.where(merged[:, token_window], reps, _arange(n, metric.device))  # (B, 1, N): row layout
    return plan_from_targets(target, n - n_sel * (k - 1))


def bipartite_merge_plan(metric: torch.Tensor, grid, window, num_remove: int, seed: int = 0) -> MergePlan | None:
    """Detail-stage merge: grid-aware bipartite soft matching (ToMe-SD style).

    One seeded destination per whole window; every other token (border tokens too) is a source, and
    the `num_remove` sources most similar to their best destination merge into it.
    """
    b, n, _ = metric.shape
    idx, border = window_layout(tuple(grid), tuple(window), metric.device)
    n_win, k = idx.shape
    if n_win == 0 or k < 2:
        return None
    num_remove = min(num_remove, n - n_win)
    if num_remove <= 0:
        return None
    idx_t, _, _ = window_tables(tuple(grid), tuple(window), metric.device)
    pos = random_window_positions(n_win, k, seed, 1, metric.device)  # (1, n_win)
    dst_idx = torch.gather(idx_t, 0, pos).squeeze(0)  # (n_win,)
    others = _other_positions(k, metric.device)[pos.squeeze(0)]  # (n_win, K-1)
    src_idx = torch.cat([torch.gather(idx, 1, others).reshape(-1), border])
    unit = _normalized(metric)
    best, best_j = (unit[:, src_idx] @ unit[:, dst_idx].transpose(1, 2)).max(dim=-1)  # (B, n_src)
    merged = (best if best.dtype == torch.float32 else best.float()).topk(num_remove, dim=1).indices
    target = _arange(n, metric.device).expand(b, n).scatter(1, src_idx[merged], dst_idx[best_j.gather(1, merged)])
    return plan_from_targets(target, n - num_remove)


@functools.lru_cache(maxsize=16)
def _other_positions(k: int, device) -> torch.Tensor:
    """Row p lists the K-1 window positions other than p."""
    full = torch.arange(k).expand(k, k)
    return full[~torch.eye(k, dtype=torch.bool)].reshape(k, k - 1).to(device)


RATIO_BUCKETS = 20  # a ratio moving with progress is rounded to 1/20: a compiled model sees few shapes


def bucket_ratio(ratio: float) -> float:
    """`ratio` to the nearest multiple of 1 / RATIO_BUCKETS (for ratios that change with progress)."""
    return round(ratio * RATIO_BUCKETS) / RATIO_BUCKETS


def max_merge_ratio(window) -> float:
    """Largest fraction of tokens a window size lets either matcher remove."""
    k = _prod(window)
    return (k - 1) / k


def scatter_index(shared, selection: torch.Tensor, dim: int, shape: tuple) -> torch.Tensor:
    """The selection (B, k) as a scatter index of `shape`, k along `dim`; once per call and shape."""
    def make():
        view = [selection.shape[0]] + [1] * (len(shape) - 1)
        view[dim] = selection.shape[1]
        return selection.view(*view).expand(*shape)

    return make() if shared is None else shared.get(("selection index", dim, shape), (selection,), make)


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

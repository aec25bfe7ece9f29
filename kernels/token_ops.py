"""Host-independent token operations: merge plans, merge/unmerge, grid-aware matching.

Every function is batched over dim 0, keeps the input dtype and device, and has
no Python loop over tokens. A merge plan maps N original tokens onto M <= N
slots; each slot is the size-weighted mean of its group, and unmerge copies a
slot's value back to every member (the exact inverse for unmerged tokens).
"""
from __future__ import annotations

import functools

import torch


class MergePlan:
    """Token -> slot assignment for one batch of token sequences.

    assign: (B, N) slot index of every original token.
    rep:    (B, M) original index of each slot's representative token, the one
            whose position (rotary id, grid cell) the slot keeps.
    sizes:  (B, M) number of original tokens in each slot (float32); a planner may
            give `sizes_col` (B, M, 1) instead, the shape merge divides by.

    Views derived from the plan (the gather index of a width, sizes as a column)
    are built once per plan: merge, unmerge and every block sharing the plan reuse them.
    """

    def __init__(self, assign: torch.Tensor, rep: torch.Tensor, sizes: torch.Tensor | None = None,
                 sizes_col: torch.Tensor | None = None, assign_col: torch.Tensor | None = None):
        if sizes is None and sizes_col is None:
            raise ValueError("MergePlan needs sizes or sizes_col")
        # A planner may hand assign / rep in row layout (B, 1, N) / (B, 1, M): the shape the rotary gather
        # of Flux-like tables wants; the (B, N) / (B, M) views are made when something asks for them.
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
        """(B, M) log of the group sizes, proportional attention's key bias (built once per plan); with
        `as_keys` (B, 1, 1, M), the layout of an attention mask over the keys."""
        if self._log_sizes is None:
            b, m = self._rep.shape[0], self.n_out
            self._log_sizes = self.sizes_col.view(b, 1, 1, m).log()
        return self._log_sizes if as_keys else self._log_sizes.view(self._log_sizes.shape[0], -1)

    def index(self, c: int) -> torch.Tensor:
        """(B, N, c) slot index of every token, repeated over c channels (merge's scatter, unmerge's gather)."""
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
        """Gather the representatives' entries of a per-token tensor along `dim`.

        `t` has the plan's batch (or 1) at dim 0 and N entries at `dim`; used for
        positional embeddings, whose trailing dims vary by family.
        """
        return take_rows(t, self._rep, dim)


def take_rows(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """t[b, ..., idx[b, j], ...] along `dim` for every row b of idx (B, K) (or (B, 1, .., K), dim + 1 axes);
    `t` has batch B or 1 (shared by every row). One indexing op: every axis up to `dim` gets a broadcasting index, so the result keeps
    t's layout."""
    if dim == 0:
        raise ValueError("take_rows indexes along a token axis after the batch axis")
    b, k = idx.shape[0], idx.shape[-1]
    lead = _lead_index(b, t.shape[0] == 1 and b > 1, tuple(t.shape[1:dim]), idx.device)
    if idx.ndim != dim + 1:  # (B, K) -> (B, 1, .., K); an index already in that layout is used as it is
        idx = idx.reshape(b, *([1] * (dim - 1)), k)
    return t[lead + (idx,)]


@functools.lru_cache(maxsize=64)
def _lead_index(batch: int, shared: bool, middle: tuple, device) -> tuple:
    """Indices of the axes before take_rows' `dim`, shaped to broadcast to (B, *middle, K): the batch
    (row 0 of a shared table, else each row its own), then every index of each middle axis."""
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
    """A read-only zero tensor of `shape` that holds one element (an expanded scalar): the start of an
    out-of-place scatter, which allocates its own output, in one op instead of zeros + an in-place scatter."""
    return _zero(dtype, device).expand(shape)


@functools.lru_cache(maxsize=16)
def _zero(dtype, device) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def _arange(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device)


@functools.lru_cache(maxsize=128)
def _slot_numbers(batch: int, m: int, device, row_layout: bool = False) -> torch.Tensor:
    """(B, m) or (B, 1, m): 1..m per row, the cumulative starter counts whose first positions are the reps."""
    return torch.arange(1, m + 1, device=device).repeat(batch, *((1, 1) if row_layout else (1,)))


@functools.lru_cache(maxsize=32)
def _ones_col(batch: int, n: int, device) -> torch.Tensor:
    return torch.ones((), device=device).expand(batch, n, 1)


def plan_from_targets(target: torch.Tensor, m: int) -> MergePlan:
    """Build a plan from `target[b, n]` (or the row layout (B, 1, N)), the token that token n merges into.

    A token that targets itself starts a slot; every other token must target
    such a starter (no chains), and every row has exactly `m` starters (passed
    in so that no device sync is needed). Slots keep the raster order of their
    starters.
    """
    b, n = target.shape[0], target.shape[-1]
    starter = target == _arange(n, target.device)
    count = starter.cumsum(-1)  # starters up to each token
    rep = torch.searchsorted(count, _slot_numbers(b, m, target.device, target.ndim == 3))  # count first reaches j
    assign = torch.searchsorted(rep, target)  # a target is a rep: its place among the reps is its slot
    assign_col = assign.transpose(1, 2) if target.ndim == 3 else assign.unsqueeze(-1)
    sizes_col = zeros_like_shape((b, m, 1), torch.float32, target.device).scatter_add(
        1, assign_col, _ones_col(b, n, target.device))
    return MergePlan(assign, rep, sizes_col=sizes_col, assign_col=assign_col)


@functools.lru_cache(maxsize=64)
def window_layout(grid: tuple, window: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole windows of a (T,)H,W token grid, and the border tokens outside them.

    Returns (idx, border): idx (n_windows, K) holds the token indices of each
    window in raster order, K = prod(window); border holds the tokens of a
    ragged edge that fill no whole window (odd grid sizes), which never act as
    merge destinations. Cached per grid, so no per-step device sync.
    """
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
    # Split every axis into (count, window) then bring the window axes last.
    split = []
    for c, w in zip(counts, window):
        split += [c, w]
    crop = crop.reshape(split)
    d = len(grid)
    crop = crop.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2))
    idx = crop.reshape(_prod(counts), _prod(window))
    in_window = torch.zeros(_prod(grid), dtype=torch.bool, device=device)
    in_window[idx.reshape(-1)] = True
    # The border count is known on the host: a stable sort puts those tokens first, in raster order.
    n_border = _prod(grid) - idx.numel()
    border = torch.argsort(in_window.to(torch.uint8), stable=True)[:n_border]
    return idx, border


@functools.lru_cache(maxsize=64)
def window_tables(grid: tuple, window: tuple, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What window merging reads per block, built once per grid: (idx_t (K, n_windows), the windows'
    tokens by position; token_window (1, N), each token's window, n_windows for border tokens;
    token_window_any (1, N), the same with border tokens sent to window 0, for lookups whose
    result a border token ignores)."""
    idx, _ = window_layout(grid, window, device)
    n_win, k = idx.shape
    n = _prod(grid)
    token_window = torch.full((n,), n_win, dtype=torch.long, device=device)
    token_window[idx.reshape(-1)] = torch.arange(n_win, device=device).unsqueeze(1).expand(n_win, k).reshape(-1)
    return idx.t().contiguous(), token_window.unsqueeze(0), token_window.clamp(max=max(n_win - 1, 0)).unsqueeze(0)


def window_reps(grid, window, seeds, device) -> tuple[torch.Tensor, ...]:
    """Per seed, (1, N): for every token, the token its window merges into (position drawn per window
    from the seed, as random_window_positions; border tokens get any token and never use it). One draw
    per seed and one gather for all of them (SDTM draws every block's at its step's first block)."""
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
    """Deterministic per-window choice in [0, k), shared by every batch row.

    One draw for the whole batch keeps each row's plan independent of whether
    ComfyUI batches cond and uncond together or calls them one by one.
    """
    device = torch.device(device)
    if device.type == "meta":  # shape-only runs (FLOP counting)
        return torch.zeros(batch, n_win, dtype=torch.long, device=device)
    # Drawn on the tokens' own device: a host-to-device copy here would stall
    # the GPU queue once per block.
    gen = torch.Generator(device=device).manual_seed(int(seed) & 0x7FFFFFFF)
    pos = torch.randint(k, (1, n_win), generator=gen, device=device)
    return pos if batch == 1 else pos.expand(batch, n_win)


def window_merge_plan(metric: torch.Tensor, grid, window, num_remove: int, seed: int = 0,
                      reps: torch.Tensor | None = None) -> MergePlan | None:
    """Structure-stage merge: collapse the most self-similar whole windows.

    Each window's score is the mean pairwise cosine similarity of its tokens,
    |sum of unit vectors|^2 / K^2, which needs no K x K matrix. The top windows
    merge into one token each (K - 1 tokens removed per window); the member
    that keeps its position is picked per window from `seed` (`reps`: window_reps
    of that seed, when the caller drew it already).
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

    One destination per whole window (position picked per window from `seed`);
    every other token is a source that proposes its most similar destination,
    and the `num_remove` most similar sources merge. Border tokens outside whole
    windows are sources, so they may merge but never receive.
    """
    b, n, _ = metric.shape
    idx, border = window_layout(tuple(grid), tuple(window), metric.device)
    n_win, k = idx.shape
    if n_win == 0 or k < 2:
        return None
    num_remove = min(num_remove, n - n_win)
    if num_remove <= 0:
        return None
    # Positions are drawn once for the whole batch, so destinations and sources are the same for every row.
    idx_t, _, _ = window_tables(tuple(grid), tuple(window), metric.device)
    pos = random_window_positions(n_win, k, seed, 1, metric.device)  # (1, n_win)
    dst_idx = torch.gather(idx_t, 0, pos).squeeze(0)  # (n_win,)
    # The other K-1 members of each window, then the border tokens, are sources.
    others = _other_positions(k, metric.device)[pos.squeeze(0)]  # (n_win, K-1)
    src_idx = torch.cat([torch.gather(idx, 1, others).reshape(-1), border])
    unit = _normalized(metric)
    best, best_j = (unit[:, src_idx] @ unit[:, dst_idx].transpose(1, 2)).max(dim=-1)  # (B, n_src)
    merged = (best if best.dtype == torch.float32 else best.float()).topk(num_remove, dim=1).indices
    target = _arange(n, metric.device).expand(b, n).scatter(1, src_idx[merged], dst_idx[best_j.gather(1, merged)])
    return plan_from_targets(target, n - num_remove)


@functools.lru_cache(maxsize=16)
def _other_positions(k: int, device) -> torch.Tensor:
    """Row p lists the K-1 window positions other than p (built on the CPU, cached per device)."""
    full = torch.arange(k).expand(k, k)
    return full[~torch.eye(k, dtype=torch.bool)].reshape(k, k - 1).to(device)


RATIO_BUCKETS = 20  # a ratio that changes from step to step moves in steps of 1/20: a compiled model sees a few shapes


def bucket_ratio(ratio: float) -> float:
    """`ratio` to the nearest multiple of 1 / RATIO_BUCKETS. For ratios that change with progress; a ratio
    that stays constant through a run is one shape already and is used as it is."""
    return round(ratio * RATIO_BUCKETS) / RATIO_BUCKETS


def max_merge_ratio(window) -> float:
    """Largest fraction of tokens a window size lets either matcher remove."""
    k = _prod(window)
    return (k - 1) / k

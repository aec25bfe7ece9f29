"""Host-independent token operations: merge plans, merge/unmerge, grid-aware matching.

Every function is batched over dim 0, keeps the input dtype and device, and has
no Python loop over tokens. A merge plan maps N original tokens onto M <= N
slots; each slot is the size-weighted mean of its group, and unmerge copies a
slot's value back to every member (the exact inverse for unmerged tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
import functools

import torch


@dataclass
class MergePlan:
    """Token -> slot assignment for one batch of token sequences.

    assign: (B, N) slot index of every original token.
    rep:    (B, M) original index of each slot's representative token, the one
            whose position (rotary id, grid cell) the slot keeps.
    sizes:  (B, M) number of original tokens in each slot (float32).
    """

    assign: torch.Tensor
    rep: torch.Tensor
    sizes: torch.Tensor

    @property
    def n_in(self) -> int:
        return self.assign.shape[1]

    @property
    def n_out(self) -> int:
        return self.rep.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, M, C): mean of each group, accumulated in float32."""
        b, _, c = x.shape
        acc = torch.zeros(b, self.n_out, c, device=x.device, dtype=torch.float32)
        acc.scatter_add_(1, self.assign.unsqueeze(-1).expand(-1, -1, c), x.float())
        return (acc / self.sizes.unsqueeze(-1)).to(x.dtype)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, M, C) -> (B, N, C): every token receives its slot's value."""
        return torch.gather(y, 1, self.assign.unsqueeze(-1).expand(-1, -1, y.shape[-1]))

    def take_rep(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Gather the representatives' entries of a per-token tensor along `dim`.

        `t` has the plan's batch (or 1) at dim 0 and N entries at `dim`; used for
        positional embeddings, whose trailing dims vary by family.
        """
        idx = self.rep
        if t.shape[0] == 1 and idx.shape[0] > 1:
            t = t.expand(idx.shape[0], *t.shape[1:])
        shape = [idx.shape[0]] + [1] * (t.ndim - 1)
        shape[dim] = idx.shape[1]
        idx = idx.reshape(shape).expand(*[s if i != dim else idx.shape[1] for i, s in enumerate(t.shape)])
        return torch.gather(t, dim, idx)


def plan_from_targets(target: torch.Tensor, m: int) -> MergePlan:
    """Build a plan from `target[b, n]`, the token that token n merges into.

    A token that targets itself starts a slot; every other token must target
    such a starter (no chains), and every row has exactly `m` starters (passed
    in so that no device sync is needed). Slots keep the raster order of their
    starters.
    """
    b, n = target.shape
    ar = torch.arange(n, device=target.device).expand(b, n)
    starter = target == ar
    slot_of_starter = starter.long().cumsum(1) - 1
    assign = torch.gather(slot_of_starter, 1, target)
    sizes = torch.zeros(b, m, device=target.device, dtype=torch.float32)
    sizes.scatter_add_(1, assign, torch.ones(b, n, device=target.device, dtype=torch.float32))
    # Non-starters write into a spill column that is dropped.
    rep = torch.zeros(b, m + 1, device=target.device, dtype=torch.long)
    rep.scatter_(1, torch.where(starter, slot_of_starter, torch.full_like(slot_of_starter, m)), ar.contiguous())
    return MergePlan(assign=assign, rep=rep[:, :m].contiguous(), sizes=sizes)


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
    border = torch.nonzero(~in_window).reshape(-1)
    return idx, border


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
    return torch.randint(k, (1, n_win), generator=gen, device=device).expand(batch, n_win)


def window_merge_plan(metric: torch.Tensor, grid, window, num_remove: int, seed: int = 0) -> MergePlan | None:
    """Structure-stage merge: collapse the most self-similar whole windows.

    Each window's score is the mean pairwise cosine similarity of its tokens,
    |sum of unit vectors|^2 / K^2, which needs no K x K matrix. The top windows
    merge into one token each (K - 1 tokens removed per window); the member
    that keeps its position is picked per window from `seed`.
    """
    b, n, _ = metric.shape
    idx, _ = window_layout(tuple(grid), tuple(window), metric.device)
    n_win, k = idx.shape
    n_sel = min(num_remove // max(k - 1, 1), n_win)
    if n_sel <= 0 or k < 2:
        return None
    unit = _normalized(metric.float())
    win_vecs = unit[:, idx.reshape(-1)].reshape(b, n_win, k, -1)
    score = win_vecs.sum(2).pow(2).sum(-1)  # (B, n_win), proportional to mean pair similarity
    chosen = score.topk(n_sel, dim=1).indices  # (B, n_sel)
    pos = torch.gather(random_window_positions(n_win, k, seed, b, metric.device), 1, chosen)
    members = idx[chosen]  # (B, n_sel, K)
    dst = torch.gather(members, 2, pos.unsqueeze(-1))  # (B, n_sel, 1)
    target = torch.arange(n, device=metric.device).expand(b, n).clone()
    target.scatter_(1, members.reshape(b, -1), dst.expand(-1, -1, k).reshape(b, -1))
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
    pos = random_window_positions(n_win, k, seed, b, metric.device)  # (B, n_win)
    members = idx.expand(b, -1, -1)
    dst_idx = torch.gather(members, 2, pos.unsqueeze(-1)).squeeze(-1)  # (B, n_win)
    # The other K-1 members of each window, then the border tokens, are sources.
    others = _other_positions(k, metric.device)[pos]  # (B, n_win, K-1)
    src_idx = torch.cat([torch.gather(members, 2, others).reshape(b, -1), border.expand(b, -1)], dim=1)
    unit = _normalized(metric)
    src = torch.gather(unit, 1, src_idx.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    dst = torch.gather(unit, 1, dst_idx.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    best, best_j = (src @ dst.transpose(1, 2)).max(dim=-1)  # (B, n_src)
    merged = best.float().topk(num_remove, dim=1).indices  # sources that merge
    target = torch.arange(n, device=metric.device).expand(b, n).clone()
    tgt_of_src = torch.gather(dst_idx, 1, best_j)  # destination token of each source
    target.scatter_(1, torch.gather(src_idx, 1, merged), torch.gather(tgt_of_src, 1, merged))
    return plan_from_targets(target, n - num_remove)


@functools.lru_cache(maxsize=16)
def _other_positions(k: int, device) -> torch.Tensor:
    """Row p lists the K-1 window positions other than p (built on the CPU, cached per device)."""
    full = torch.arange(k).expand(k, k)
    return full[~torch.eye(k, dtype=torch.bool)].reshape(k, k - 1).to(device)


def max_merge_ratio(window) -> float:
    """Largest fraction of tokens a window size lets either matcher remove."""
    k = _prod(window)
    return (k - 1) / k

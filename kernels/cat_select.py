"""CAT Pruning's token choice (arXiv 2502.00433): clusters of the predicted noise and, per pruned step,
which image tokens to compute; pure tensor functions without a device sync.
"""
from __future__ import annotations

import functools

import torch

TOP_CLUSTER_QUOTA = (3, 2, 1)  # quota multipliers of the three highest-scoring clusters
BASE_QUOTA = 0.05              # base per-cluster quota, as a fraction of the kept tokens
POSITION_WEIGHT_NOISE = 0.05   # clustering feature = POSITION_WEIGHT_NOISE x noise + position
KMEANS_ITERS = 10


def position_features(grid, dim: int, device=None) -> torch.Tensor:
    """(N, dim): each grid axis fills its share of the channels with coordinate / size."""
    coords = torch.meshgrid(*[torch.arange(g, device=device, dtype=torch.float32) / g for g in grid], indexing="ij")
    coords = [c.reshape(-1) for c in coords]
    bounds = [round(i * dim / len(grid)) for i in range(len(grid) + 1)]
    out = torch.zeros(coords[0].shape[0], dim, device=device)
    for c, a, b in zip(coords, bounds[:-1], bounds[1:]):
        out[:, a:b] = c[:, None]
    return out


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

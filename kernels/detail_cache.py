"""Detail cache for the merging methods: merged calls take their per-token detail from the last full call.

A merged block gives every member of a group the same update, so a merged call's predicted noise
lacks per-token detail. That detail changes slowly along a trajectory, so it is reused:
    noise = cached + LowPass(noise - cached)
with `cached` the row's last call in which no block merged, and LowPass an average over windows
of tokens, upsampled bilinearly (per frame for video). With no full call yet, nothing changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .runtime import call_rows


@dataclass
class DetailRunState:
    """The cached noise per batch-row key for one sampling run; `clear()` frees it."""

    rows: dict = field(default_factory=dict)
    peak_cache_bytes: int = 0

    def clear(self):
        self.rows.clear()


def low_pass(d: torch.Tensor, pool: int) -> torch.Tensor:
    """Average over pool x pool windows of the last two axes, bilinear back to full size (per frame)."""
    shape = d.shape
    flat = d.movedim(1, 2).reshape(-1, shape[1], *shape[-2:]) if d.ndim == 5 else d
    coarse = F.avg_pool2d(flat.float(), pool, ceil_mode=True)
    up = F.interpolate(coarse, size=shape[-2:], mode="bilinear", align_corners=False).to(d.dtype)
    if d.ndim == 5:
        up = up.reshape(shape[0], shape[2], shape[1], *shape[-2:]).movedim(2, 1)
    return up


class DetailCache:
    def __init__(self, window: int):
        self.window = int(window)

    def new_run_state(self) -> DetailRunState:
        return DetailRunState()

    def end_call(self, state: DetailRunState, call, noise: torch.Tensor):
        """(noise with the cached detail, all-False computed mask) for a reduced call, else None."""
        if noise.ndim not in (4, 5):
            return None
        keys = call_rows(call, noise.shape[0])
        if not call.reduced:
            for i, key in enumerate(keys):
                state.rows[key] = noise[i].detach().clone()
            state.peak_cache_bytes = max(state.peak_cache_bytes,
                                         sum(t.numel() * t.element_size() for t in state.rows.values()))
            return None
        cached = [state.rows.get(key) for key in keys]
        if any(c is None or c.shape != noise.shape[1:] or c.device != noise.device for c in cached):
            return None
        ref = torch.stack(cached).to(noise.dtype)
        blended = ref + low_pass(noise - ref, self.window * int(call.patch))
        return blended, torch.zeros((1,) * noise.ndim, dtype=torch.bool, device=noise.device)

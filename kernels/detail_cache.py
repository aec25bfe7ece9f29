"""Detail cache for the merging methods (SDTM, density schedule), host-independent.

A merged block gives every member of a group the same update, so the model's predicted noise
loses its per-token detail in merged calls. On the trained reference model that shows as
per-token noise in the final image: the part of each token's noise that differs from its
group's is never removed. That detail changes slowly along a trajectory (in rectified flow the
noise target is the same at every step), so it can be reused, the way CAT reuses whole tokens:

    noise = cached + LowPass(noise - cached)

`cached` is the predicted noise of the row's last call in which no block merged (the warm-up
steps before `start_percent`), and LowPass averages over windows of `window` tokens and
upsamples bilinearly (per frame for video). The merged call thus decides the coarse picture and
the last full call supplies the detail. Without a full call before merging starts (start_percent
0, img2img that starts late), nothing is cached and the merged output is used as it is.

Off by default: on the trained reference model it is worth +4 dB at the same FLOPs, but the detail
comes from an early step, and models whose fine texture forms late (large images) may come out
softer; on random-weight models, whose predictions change from step to step, it moves the output
further. Measured evidence first (README, "Evidence").

Protocol (kernels.block_patch): `new_run_state()`, `begin_call(state, call, x, num_blocks)`,
`end_call(state, noise, grid, patch)`; a call is "reduced" when any block merged in it
(CallInfo.reduced, set by the block replacement).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .block_patch import call_rows


@dataclass
class DetailRunState:
    """The cached noise per batch-row key for one sampling run; `clear()` frees it."""

    rows: dict = field(default_factory=dict)
    call: object = None
    peak_cache_bytes: int = 0

    def clear(self):
        self.rows.clear()
        self.call = None


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
    """Reuses the last full call's per-token detail in merged calls (see the module docstring)."""

    def __init__(self, window: int):
        self.window = int(window)

    def new_run_state(self) -> DetailRunState:
        return DetailRunState()

    def begin_call(self, state: DetailRunState, call, x: torch.Tensor, num_blocks: int):
        state.call = call

    def end_call(self, state: DetailRunState, noise: torch.Tensor, grid, patch: int):
        """(noise with the cached detail, all-False computed mask) for a reduced call, else None."""
        call, state.call = state.call, None
        if call is None or noise.ndim not in (4, 5):
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
        blended = ref + low_pass(noise - ref, self.window * int(patch))
        return blended, torch.zeros((1,) * noise.ndim, dtype=torch.bool, device=noise.device)


class DetailCached:
    """Mixin for a merging method: the detail-cache protocol, delegated to `self.detail_cache`
    (a DetailCache, or None when switched off: then the run state is None and nothing is kept)."""

    detail_cache: DetailCache | None = None

    def new_run_state(self) -> DetailRunState | None:
        return self.detail_cache.new_run_state() if self.detail_cache is not None else None

    def begin_call(self, state: DetailRunState, call, x: torch.Tensor, num_blocks: int):
        self.detail_cache.begin_call(state, call, x, num_blocks)

    def end_call(self, state: DetailRunState, noise: torch.Tensor, grid, patch: int):
        return self.detail_cache.end_call(state, noise, grid, patch)

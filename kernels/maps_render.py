"""Token maps over ComfyUI images (H, W, 3) in plain torch: group colours, a legend strip, the overlay."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .draw import colormap, paste, text_mask


def group_colours(ids: torch.Tensor) -> torch.Tensor:
    """A distinct, stable colour per positive id (golden-ratio hues); id 0 -> black."""
    h = (ids.float() * 0.61803398875) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0], device=ids.device) + h.unsqueeze(-1) * 6) % 6
    rgb = 1 - 0.8 * (torch.minimum(k, 4 - k).clamp(0, 1))  # HSV with s=0.8, v=1
    return rgb * (ids > 0).unsqueeze(-1).float()


def legend(width: int, title: str, lo: str, hi: str, discrete: bool) -> torch.Tensor:
    """A dark strip: title on the first line, a colour bar with its end labels on the second."""
    scale = max(1, min(3, width // 256))
    line = 7 * scale
    strip = torch.full((2 * line + 3 * scale, width, 3), 0.08)
    paste(strip, text_mask(title, scale), scale, 2 * scale)
    lo_m, hi_m = text_mask(lo, scale), text_mask(hi, scale)
    y = line + 2 * scale
    paste(strip, lo_m, y, 2 * scale)
    x0 = 4 * scale + lo_m.shape[1]
    x1 = width - 4 * scale - hi_m.shape[1]
    if x1 - x0 > 4:
        ramp = torch.linspace(0, 1, x1 - x0)
        bar = group_colours(torch.arange(1, x1 - x0 + 1) // max((x1 - x0) // 12, 1) + 1) if discrete \
            else colormap(ramp)
        strip[y:y + 5 * scale, x0:x1] = bar.unsqueeze(0)
    paste(strip, hi_m, y, max(x1 + 2 * scale, 0))
    return strip


def overlay(image: torch.Tensor, values: torch.Tensor, title: str, opacity: float, kind: str,
            vmax: float | None = None) -> torch.Tensor:
    """Blend a token map (h, w) over an image (H, W, 3), legend strip below. Continuous kinds scale to
    [0, vmax] (default the map's max); "merge_groups" colours each group and leaves id 0 clear."""
    H, W, _ = image.shape
    v = values.float().cpu()
    discrete = kind == "merge_groups"
    if discrete:
        rgb = group_colours(v.long())
        alpha = (v > 0).float()
        lo, hi = "UNMERGED: CLEAR", f"{int((v.unique() > 0).sum())} GROUPS"
    else:
        vmin = 0.0
        vmax = float(v.max()) if vmax is None else float(vmax)
        vmax = vmax if vmax > vmin else vmin + 1.0
        rgb = colormap((v - vmin) / (vmax - vmin))
        alpha = torch.ones_like(v)
        lo, hi = _fmt(vmin), _fmt(vmax)
    up = F.interpolate(torch.cat([rgb, alpha.unsqueeze(-1)], -1).permute(2, 0, 1).unsqueeze(0), size=(H, W),
                       mode="nearest").squeeze(0).permute(1, 2, 0)
    a = (opacity * up[..., 3:]).clamp(0, 1)
    blended = image.float().cpu()[..., :3] * (1 - a) + up[..., :3] * a
    return torch.cat([blended, legend(W, title, lo, hi, discrete)], dim=0).clamp(0, 1)


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100 or x == int(x):
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.1e}"

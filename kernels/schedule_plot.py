"""A TokenRatioSchedule as a heat map IMAGE (1, H, W, 3) for Preview Image, drawn with plain torch:
progress left to right, depth bottom (first block) to top, a ratio colour bar on the right."""
from __future__ import annotations

import torch

from .draw import colormap, draw_text, text_width
from .schedule import TokenRatioSchedule, block_depth

_INK = torch.tensor([0.92, 0.92, 0.92])
_BACKGROUND = 0.12


def render(schedule: TokenRatioSchedule, num_blocks: int | None = None, width: int = 240, height: int = 144,
           vmax: float | None = None) -> torch.Tensor:
    """Heat map of `schedule` with axes, title and colour bar; with `num_blocks`, one band per block
    (what a model of that depth sees), else continuous depth."""
    s = 2  # font scale
    left, top, gap, bar = 40, 30, 10, 10
    canvas_w = left + width + gap + bar + 36
    canvas_h = top + height + 30
    img = torch.full((canvas_h, canvas_w, 3), _BACKGROUND)
    # Sample the schedule at pixel centres: rows top = last block (depth 1), columns = progress.
    ps = [(j + 0.5) / width for j in range(width)]
    if num_blocks:
        rows = [block_depth(min(int((height - 1 - i) * num_blocks / height), num_blocks - 1), num_blocks)
                for i in range(height)]
    else:
        rows = [1.0 - (i + 0.5) / height for i in range(height)]
    cache = {}
    values = torch.tensor([[cache.setdefault((d, p), schedule.ratio(d, p)) for p in ps] for d in rows])
    top_v = float(values.max()) if vmax is None else vmax
    top_v = max(top_v, 1e-6)
    img[top:top + height, left:left + width] = colormap(values / top_v)
    # Colour bar, ratio 0 at the bottom.
    bx = left + width + gap
    ramp = torch.linspace(1, 0, height).unsqueeze(1).expand(height, bar)
    img[top:top + height, bx:bx + bar] = colormap(ramp)
    # Frames.
    for x0, x1 in ((left, left + width), (bx, bx + bar)):
        img[top - 1, x0 - 1:x1 + 1] = _INK
        img[top + height, x0 - 1:x1 + 1] = _INK
        img[top - 1:top + height + 1, x0 - 1] = _INK
        img[top - 1:top + height + 1, x1] = _INK
    # Ticks and labels.
    for frac, label in ((0.0, "0"), (0.5, "0.5"), (1.0, "1")):
        x = left + int(round(frac * (width - 1)))
        img[top + height + 1:top + height + 4, x] = _INK
        draw_text(img, label, min(max(x - text_width(label, s) // 2, 0), canvas_w - text_width(label, s)),
                  top + height + 5, s)
        y = top + int(round((1.0 - frac) * (height - 1)))
        img[y, left - 4:left - 1] = _INK
        draw_text(img, label, left - 6 - text_width(label, s), min(max(y - 5, top - 5), top + height - 5), s)
    draw_text(img, "PROGRESS", left + width // 2 - text_width("PROGRESS", s) // 2, top + height + 18, s)
    draw_text(img, "DEPTH", 2, top - 13, s)
    draw_text(img, f"{top_v:.2f}", bx - 4, top - 13, s)
    draw_text(img, "0", bx + bar + 3, top + height - 10, s)
    draw_text(img, "RATIO", bx + bar + 3, top + height // 2 - 5, 1)
    title = schedule.name.upper()
    limit = (canvas_w - 4) // (4 * s)
    if len(title) > limit:
        title = title[:limit - 2] + ".."
    draw_text(img, title, 2, 3, s, colour=(0.8, 0.85, 1.0))
    return img.unsqueeze(0).float()

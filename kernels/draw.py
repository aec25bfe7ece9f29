"""Drawing in plain torch (no PIL, no matplotlib): a viridis colour map and a 3x5 pixel font, on
(H, W, 3) float images in [0, 1]."""
from __future__ import annotations

import torch

# Viridis, sampled at 9 points and interpolated linearly.
_VIRIDIS = torch.tensor([
    [0.267, 0.005, 0.329], [0.283, 0.141, 0.458], [0.254, 0.265, 0.530], [0.207, 0.372, 0.553],
    [0.164, 0.471, 0.558], [0.128, 0.567, 0.551], [0.135, 0.659, 0.518], [0.267, 0.749, 0.441],
    [0.993, 0.906, 0.144]])


def colormap(v: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] (any shape) -> RGB (..., 3)."""
    v = v.float().clamp(0, 1).nan_to_num(0.0) * (len(_VIRIDIS) - 1)
    i0 = v.floor().long().clamp(max=len(_VIRIDIS) - 2)
    w = (v - i0).unsqueeze(-1)
    pal = _VIRIDIS.to(v.device)
    return pal[i0] * (1 - w) + pal[i0 + 1] * w


# 3x5 pixel font: five rows of three pixels per glyph, top to bottom ("#" = ink).
_FONT = {
    "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.", "C": ".## #.. #.. #.. .##",
    "D": "##. #.# #.# #.# ##.", "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..",
    "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#", "I": "### .#. .#. .#. ###",
    "J": "..# ..# ..# #.# .#.", "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###",
    "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#", "O": ".#. #.# #.# #.# .#.",
    "P": "##. #.# ##. #.. #..", "Q": ".#. #.# #.# ##. .##", "R": "##. #.# ##. #.# #.#",
    "S": ".## #.. .#. ..# ##.", "T": "### .#. .#. .#. .#.", "U": "#.# #.# #.# #.# ###",
    "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# ### ### #.#", "X": "#.# #.# .#. #.# #.#",
    "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "##. ..# .#. #.. ###",
    "3": "##. ..# .#. ..# ##.", "4": "#.# #.# ### ..# ..#", "5": "### #.. ##. ..# ##.",
    "6": ".## #.. ### #.# ###", "7": "### ..# .#. .#. .#.", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ##.",
    " ": "... ... ... ... ...", ".": "... ... ... ... .#.", ",": "... ... ... .#. #..",
    ":": "... .#. ... .#. ...", "-": "... ... ### ... ...", "/": "..# ..# .#. #.. #..",
    "%": "#.# ..# .#. #.. #.#", "(": ".#. #.. #.. #.. .#.", ")": ".#. ..# ..# ..# .#.",
    "=": "... ### ... ### ...", "+": "... .#. ### .#. ...", "_": "... ... ... ... ###",
    "?": "##. ..# .#. ... .#.", ">": "#.. .#. ..# .#. #..",
}


def _glyph(ch: str) -> torch.Tensor:
    rows = _FONT.get(ch, _FONT["?"]).split()
    return torch.tensor([[c == "#" for c in r] for r in rows], dtype=torch.float32)


def text_mask(text: str, scale: int = 2) -> torch.Tensor:
    """(5*scale, 4*len*scale) mask of `text` in the 3x5 font (upper case), one column between."""
    cols = []
    for ch in text.upper():
        cols += [_glyph(ch), torch.zeros(5, 1)]
    m = torch.cat(cols, dim=1) if cols else torch.zeros(5, 1)
    return m.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def paste(canvas: torch.Tensor, mask: torch.Tensor, y: int, x: int, colour=(1.0, 1.0, 1.0)):
    """Blend `colour` into canvas through mask (h, w) placed at (y, x), clipped at the edges."""
    y0, x0 = max(y, 0), max(x, 0)
    mask = mask[y0 - y:, x0 - x:]
    h = min(mask.shape[0], canvas.shape[0] - y0)
    w = min(mask.shape[1], canvas.shape[1] - x0)
    if h <= 0 or w <= 0:
        return
    m = mask[:h, :w].unsqueeze(-1)
    region = canvas[y0:y0 + h, x0:x0 + w]
    canvas[y0:y0 + h, x0:x0 + w] = region * (1 - m) + torch.as_tensor(colour, dtype=canvas.dtype) * m


def text_width(text: str, scale: int = 1) -> int:
    """Width in pixels of `text` drawn at `scale` (no trailing gap)."""
    return 4 * scale * len(text) - scale


def draw_text(img: torch.Tensor, text: str, x: int, y: int, scale: int = 1, colour=(0.92, 0.92, 0.92)):
    """Write `text` into img (H, W, 3) with its top-left corner at (x, y); clipped at the edges."""
    paste(img, text_mask(text, scale), y, x, colour)

"""Procedural class-conditioned images for training the reference DiT (no PIL, no data files).

    images, labels = sample_batch(16, torch.Generator().manual_seed(0))   # (16, 3, 64, 64) in [-1, 1]
    images, labels = dataset("scenes").sample(16, generator, size=256)     # the 256 px model's scenes

Two data sets (DATASETS), each ten classes. "shapes" (sample_batch; the 64 px and 128 px models):
each class a shape or a pattern drawn as a signed distance field
(SDF) with a soft, anti-aliased edge, at a random position, size, rotation and colour,
over a flat, linear-gradient or low-frequency-noise background. Shapes carry a mild
colour texture and every pixel a little noise. So every image has large smooth regions
and sharp edges, the two cases that token merging has to tell apart.

"scenes" (sample_scenes; the 256 px model): simple scenes a person names at a glance (SCENE_NAMES),
painted back to front with soft gradients, edges, textures at several scales and objects over backgrounds.

Everything is batched torch, drawn only from the given torch.Generator, so a seed gives the same batch on
every machine and torch build that share the CPU RNG.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

CLASS_NAMES = ("circle", "square", "triangle", "ring", "horizontal stripes", "vertical stripes",
               "checkerboard", "cross", "two blobs", "polka dots")
NUM_CLASSES = len(CLASS_NAMES)


def _u(gen: torch.Generator, n: int, lo: float, hi: float, *shape) -> Tensor:
    """Uniform (n, *shape) in [lo, hi), broadcastable against (n, H, W) when shape is ()."""
    x = torch.rand((n, *shape), generator=gen, device=gen.device) * (hi - lo) + lo
    return x.view(n, *shape, *([1, 1] if not shape else []))


def _rotate(x: Tensor, y: Tensor, angle: Tensor) -> tuple[Tensor, Tensor]:
    c, s = torch.cos(angle), torch.sin(angle)
    return c * x + s * y, -s * x + c * y


def _box(x: Tensor, y: Tensor, hx, hy) -> Tensor:
    qx, qy = x.abs() - hx, y.abs() - hy
    return torch.hypot(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def _triangle(x: Tensor, y: Tensor, r) -> Tensor:
    """Equilateral triangle of inradius-scale r (Inigo Quilez's exact SDF)."""
    k = math.sqrt(3.0)
    x, y = x.abs() - r, y + r / k
    fold = (x + k * y) > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - torch.minimum(torch.maximum(x, -2 * r), torch.zeros_like(x))
    return -torch.hypot(x, y) * torch.sign(y)


def _lowfreq(gen: torch.Generator, n: int, channels: int, cells: int, size: int) -> Tensor:
    """Smooth noise in [0, 1]: a (cells x cells) random grid, bicubic-upsampled, rescaled per image."""
    t = F.interpolate(torch.rand(n, channels, cells, cells, generator=gen), size=(size, size),
                      mode="bicubic", align_corners=False)
    lo = t.amin(dim=(1, 2, 3), keepdim=True)
    hi = t.amax(dim=(1, 2, 3), keepdim=True)
    return (t - lo) / (hi - lo).clamp(min=1e-6)


def _class_sdfs(gen: torch.Generator, n: int, x: Tensor, y: Tensor) -> Tensor:
    """(NUM_CLASSES, n, H, W) signed distances (negative inside), coordinates in [0, 1]."""
    cx, cy = _u(gen, n, 0.3, 0.7), _u(gen, n, 0.3, 0.7)
    r = _u(gen, n, 0.12, 0.27)
    angle = _u(gen, n, 0.0, 2 * math.pi)
    px, py = _rotate(x - cx, y - cy, angle)
    # patterned classes fill a large box (region) around the centre
    region = _box(x - _u(gen, n, 0.42, 0.58), y - _u(gen, n, 0.42, 0.58), _u(gen, n, 0.24, 0.42),
                  _u(gen, n, 0.24, 0.42))
    period = _u(gen, n, 0.07, 0.14)
    phase = _u(gen, n, 0.0, 1.0)

    def stripes(t):  # bands of half the period, negative inside
        return ((torch.frac(t / period + phase) - 0.5).abs() - 0.25) * period

    circle = torch.hypot(px, py) - r
    square = _box(px, py, 0.85 * r, 0.85 * r)
    triangle = _triangle(px, py, 1.1 * r)
    ring = (torch.hypot(px, py) - 1.1 * r).abs() - _u(gen, n, 0.025, 0.06)
    h_stripes = torch.maximum(region, stripes(y))
    v_stripes = torch.maximum(region, stripes(x))
    cell = period * 0.8
    checker = torch.maximum(region, -torch.sin(math.pi * x / cell) * torch.sin(math.pi * (y / cell + phase))
                            * cell / math.pi)
    arm = r * _u(gen, n, 0.25, 0.4)
    cx_rot, cy_rot = _rotate(x - cx, y - cy, _u(gen, n, -0.3, 0.3))
    cross = torch.minimum(_box(cx_rot, cy_rot, 1.1 * r, arm), _box(cx_rot, cy_rot, arm, 1.1 * r))
    # two blobs: a second centre 0.3-0.45 away in a random direction, kept inside the frame
    dist, dirn = _u(gen, n, 0.3, 0.45), _u(gen, n, 0.0, 2 * math.pi)
    bx1, by1 = _u(gen, n, 0.25, 0.75), _u(gen, n, 0.25, 0.75)
    bx2 = (bx1 + dist * torch.cos(dirn)).clamp(0.15, 0.85)
    by2 = (by1 + dist * torch.sin(dirn)).clamp(0.15, 0.85)
    rb = _u(gen, n, 0.08, 0.14)
    blobs = torch.minimum(torch.hypot(x - bx1, y - by1), torch.hypot(x - bx2, y - by2)) - rb
    lattice = period * 1.3
    dots = torch.hypot(torch.frac(x / lattice + phase) - 0.5, torch.frac(y / lattice) - 0.5) * lattice \
        - lattice * _u(gen, n, 0.2, 0.33)
    dots = torch.maximum(region, dots)
    return torch.stack([circle, square, triangle, ring, h_stripes, v_stripes, checker, cross, blobs, dots])


def sample_batch(n: int, generator: torch.Generator, size: int = 64, labels: Tensor | None = None
                 ) -> tuple[Tensor, Tensor]:
    """(images (n, 3, size, size) float32 in [-1, 1], labels (n,) long in [0, NUM_CLASSES)).

    `labels` fixes the classes; otherwise they are drawn uniformly. The same generator
    state always gives the same batch.
    """
    gen = generator
    drawn = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    labels = drawn if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(n)
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in [0, {NUM_CLASSES})")
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)

    # background: flat, linear gradient or low-frequency noise between two colours
    c1, c2 = _u(gen, n, -0.85, 0.85, 3), _u(gen, n, -0.85, 0.85, 3)
    c1, c2 = c1.view(n, 3, 1, 1), c2.view(n, 3, 1, 1)
    theta = _u(gen, n, 0.0, 2 * math.pi)
    grad = (x - 0.5) * torch.cos(theta) + (y - 0.5) * torch.sin(theta)
    grad = (grad / math.sqrt(0.5) + 0.5).clamp(0, 1).unsqueeze(1)
    noise_bg = _lowfreq(gen, n, 1, 4, size)
    kind = torch.randint(0, 3, (n, 1, 1, 1), generator=gen)
    t = torch.where(kind == 0, torch.zeros_like(grad), torch.where(kind == 1, grad, noise_bg))
    bg = c1 + (c2 - c1) * t

    # foreground colour, far from the mean background colour (of the two directions, the one
    # that survives clamping to [-1, 1] best), plus a mild smooth colour texture
    bg_mean = (c1 + c2) / 2
    dirn = torch.randn(n, 3, 1, 1, generator=gen)
    dirn = dirn / dirn.norm(dim=1, keepdim=True).clamp(min=1e-6)
    mag = _u(gen, n, 0.9, 1.5).view(n, 1, 1, 1)
    cand = torch.stack([(bg_mean + mag * dirn).clamp(-1, 1), (bg_mean - mag * dirn).clamp(-1, 1)])
    far = ((cand - bg_mean).norm(dim=2, keepdim=True)).argmax(dim=0, keepdim=True)
    fg = cand.gather(0, far.expand(1, n, 3, 1, 1))[0]
    fg = fg + _u(gen, n, 0.0, 0.3).view(n, 1, 1, 1) * (_lowfreq(gen, n, 3, 8, size) - 0.5)

    sdf = _class_sdfs(gen, n, x, y)[labels, torch.arange(n)]  # (n, H, W)
    edge_px = _u(gen, n, 0.5, 1.2)
    edge_px = torch.where((labels == 8).view(n, 1, 1), edge_px * 3.0, edge_px)  # blobs are soft
    alpha = torch.sigmoid(-sdf * size / edge_px).unsqueeze(1)
    img = bg * (1 - alpha) + fg * alpha
    img = img + 0.02 * torch.randn(img.shape, generator=gen)
    return img.clamp(-1, 1).contiguous(), labels


# ---- scenes: the data of the 256 px model -------------------------------------------------------------
# Ten kinds of simple scene that a person names at a glance. Real pictures put large smooth regions (sky,
# walls, water) next to edges (horizons, roofs, window frames) and texture at several scales (grass,
# waves, wood, crop rows), with objects over a background: that is what token reduction meets at Flux's
# grid, and what the stripes above lack. Each kind is drawn only for the pictures of its class.

SCENE_NAMES = ("mountains", "house", "still life", "window", "flowers", "face", "fields", "beach", "night city",
               "forest")

DAY, DUSK, GREY = 0, 1, 2  # sky palettes: zenith and horizon colours (RGB in [-1, 1])
SKY_TOP = ((-0.6, -0.15, 0.6), (-0.4, -0.5, 0.1), (-0.1, -0.05, 0.1))
SKY_LOW = ((0.45, 0.7, 0.95), (0.95, 0.45, -0.15), (0.6, 0.6, 0.62))
GREENS = ((-0.5, 0.2, -0.6), (-0.3, 0.35, -0.55), (-0.1, 0.3, -0.5), (-0.6, -0.05, -0.6))


class _Canvas:
    """n pictures painted back to front. x grows to the right, y downwards, both in [0, 1]; lengths are in
    picture widths. Everything is 4-D so that it broadcasts: parameters (n, 1, 1, 1), one value per picture;
    fields (n, 1, H, W); colours (n, 3, 1, 1) or (n, 3, H, W)."""

    def __init__(self, gen: torch.Generator, n: int, size: int):
        self.gen, self.n, self.size, self.device = gen, n, size, gen.device
        c = (torch.arange(size, dtype=torch.float32, device=gen.device) + 0.5) / size
        self.x, self.y = c.view(1, 1, 1, size), c.view(1, 1, size, 1)
        self.img = torch.zeros(n, 3, size, size, device=gen.device)

    def u(self, lo: float, hi: float) -> Tensor:
        return _u(self.gen, self.n, lo, hi).view(self.n, 1, 1, 1)

    def pick(self, k: int) -> Tensor:
        return torch.randint(0, k, (self.n,), generator=self.gen, device=self.device)

    def colour(self, bases, index: Tensor | None = None, jitter: float = 0.12) -> Tensor:
        """(n, 3, 1, 1): one of `bases` per picture (at `index`, else drawn), every channel jittered."""
        table = torch.tensor(bases, dtype=torch.float32, device=self.device)
        base = table[self.pick(len(bases)) if index is None else index]
        jit = (torch.rand(self.n, 3, generator=self.gen, device=self.device) * 2 - 1) * jitter
        return (base + jit).clamp(-1, 1).view(self.n, 3, 1, 1)

    def noise(self, cells_y: int, cells_x: int | None = None) -> Tensor:
        """(n, 1, H, W) smooth noise in [0, 1]: a random grid of cells, bilinearly upsampled."""
        grid = torch.rand(self.n, 1, cells_y, cells_x or cells_y, generator=self.gen, device=self.device)
        return F.interpolate(grid, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def texture(self, colour: Tensor, *octaves: tuple) -> Tensor:
        """`colour` with noise added: octaves of (cells, amplitude) or (cells_y, cells_x, amplitude)."""
        for *cells, amp in octaves:
            colour = colour + amp * (self.noise(*cells) - 0.5)
        return colour

    def ramp(self, y0, y1) -> Tensor:
        """(n, 1, H, 1): 0 above y0, rising linearly to 1 at y1."""
        return ((self.y - y0) / (y1 - y0)).clamp(0, 1)

    def fill(self, colour: Tensor):
        self.img.copy_(colour.expand_as(self.img))

    def blend(self, alpha: Tensor, colour: Tensor):
        """Lay `colour` with opacity `alpha` (in [0, 1], broadcastable to (n, 1, H, W))."""
        self.img.lerp_(colour, alpha)

    def paint(self, sdf: Tensor, colour: Tensor, soft=1.0, opacity=1.0):
        """Lay `colour` where the signed distance `sdf` < 0, its edge `soft` pixels wide (anti-aliased)."""
        self.blend((0.5 - sdf * (self.size / soft)).clamp(0, 1) * opacity, colour)

    def disc(self, cx, cy, r) -> Tensor:
        return torch.hypot(self.x - cx, self.y - cy) - r

    def box(self, cx, cy, hx, hy) -> Tensor:
        return _box(self.x - cx, self.y - cy, hx, hy)

    def sky(self, horizon, palette: Tensor | None = None, clouds: float = 0.7):
        """Sky from zenith to a paler horizon, with soft clouds; returns the palette index per picture."""
        palette = self.pick(3) if palette is None else palette
        top, low = self.colour(SKY_TOP, palette, 0.1), self.colour(SKY_LOW, palette, 0.1)
        self.fill(top + (low - top) * self.ramp(0.0, horizon) ** 0.8)
        cover = ((self.noise(6, 3) * 0.6 + self.noise(16, 8) * 0.4 - self.u(0.45, 0.75)) * 4).clamp(0, 1)
        white = self.colour(((0.9, 0.9, 0.92),), jitter=0.05)
        self.blend(cover * clouds * (1 - self.ramp(horizon - 0.15, horizon)), white)
        return palette

    def ridge(self, base, height, freqs) -> Tensor:
        """(n, 1, 1, W) skyline with sharp peaks: base - height * (1 - |sin|) summed over `freqs` ranges."""
        y = base + 0 * self.x
        for (lo, hi), share in freqs:
            y = y - height * share * (1 - torch.sin(math.pi * (self.u(lo, hi) * self.x + self.u(0, 1))).abs())
        return y

    def tree(self, cx, ground, h, conifer: Tensor, shade: Tensor):
        """A tree of height h standing at (cx, ground): a trunk, then a cone or a round, textured crown."""
        self.paint(self.box(cx, ground - 0.2 * h, 0.06 * h, 0.2 * h), self.colour(((-0.35, -0.55, -0.7),), jitter=0.1))
        apex, foot, slope = ground - h, ground - 0.15 * h, 0.35 / 0.85  # the cone widens by `slope` per height
        cone = torch.maximum(torch.maximum(apex - self.y, self.y - foot),
                             ((self.x - cx).abs() - (self.y - apex) * slope) / math.sqrt(1 + slope ** 2))
        crown = torch.minimum(self.disc(cx, ground - 0.62 * h, 0.3 * h),
                              self.disc(cx + 0.15 * h, ground - 0.45 * h, 0.22 * h))
        crown = torch.minimum(crown, self.disc(cx - 0.16 * h, ground - 0.46 * h, 0.21 * h))
        leaves = self.texture(shade, (24, 0.25), (6, 0.15))
        self.paint(torch.where(conifer, cone, crown), leaves)


def _mountains(c: _Canvas):
    horizon = c.u(0.5, 0.65)
    palette = c.sky(horizon)
    c.paint(c.disc(c.u(0.15, 0.85), c.u(0.1, 0.35), c.u(0.04, 0.07)), c.colour(((1.0, 0.9, 0.4), (1.0, 0.6, 0.2))))
    far = c.ridge(horizon, c.u(0.25, 0.4), [((1.0, 2.5), 0.6), ((3, 6), 0.3), ((8, 14), 0.1)])
    rock = c.colour(((-0.35, -0.3, -0.05), (-0.2, -0.25, -0.3), (0.1, -0.1, -0.3)))
    c.paint(far - c.y, c.texture(rock + 0.4 * c.ramp(horizon - 0.3, horizon), (40, 0.15), (10, 0.2)))
    snow = torch.maximum(far - c.y, c.y - (horizon - c.u(0.22, 0.3)))
    c.paint(snow, c.colour(((0.95, 0.95, 0.98),), jitter=0.04) - 0.2 * (palette == DUSK).view(-1, 1, 1, 1))
    near = c.ridge(horizon + c.u(0.02, 0.08), c.u(0.04, 0.1), [((1.0, 2.0), 1.0)])
    c.paint(near - c.y, c.texture(c.colour(GREENS), (64, 0.2), (12, 0.25)) - 0.3 * c.ramp(horizon, 1.0))


def _house(c: _Canvas):
    ground = c.u(0.6, 0.75)
    c.sky(ground, c.pick(2))
    c.paint(ground - c.y, c.texture(c.colour(GREENS), (80, 0.2), (10, 0.2)))
    hx, w, h = c.u(0.35, 0.65), c.u(0.17, 0.26), c.u(0.12, 0.2)
    top = ground - 2 * h
    c.paint(c.box(hx + 0.55 * w, top - 0.05, 0.03, 0.08), c.colour(((0.3, -0.4, -0.5),)))  # chimney
    wall = c.colour(((0.85, 0.8, 0.65), (0.75, 0.2, -0.1), (0.4, 0.55, 0.7), (0.9, 0.75, 0.3)))
    c.paint(c.box(hx, ground - h, w, h), c.texture(wall, (48, 0.08)))
    apex = top - c.u(0.12, 0.2)
    slope = (top - apex) / (w + 0.04)
    roof = torch.maximum((apex + (c.x - hx).abs() * slope - c.y) / torch.sqrt(1 + slope ** 2), c.y - top)
    c.paint(roof, c.colour(((0.5, -0.45, -0.5), (-0.4, -0.4, -0.35), (-0.1, -0.45, -0.7))))
    c.paint(c.box(hx + c.u(-0.4, 0.4) * w, ground - 0.28 * h, 0.13 * w, 0.28 * h), c.colour(((-0.2, -0.55, -0.75),)))
    glass = c.colour(((0.6, 0.8, 0.95), (0.95, 0.85, 0.3)))
    for side in (-1, 1):
        wx, wy = hx + side * 0.55 * w, ground - 1.35 * h
        c.paint(c.box(wx, wy, 0.2 * w, 0.3 * h), c.colour(((0.95, 0.95, 0.95),), jitter=0.03))
        c.paint(c.box(wx, wy, 0.16 * w, 0.25 * h), glass)
        c.paint(torch.minimum(c.box(wx, wy, 0.16 * w, 0.02 * h), c.box(wx, wy, 0.01, 0.25 * h)),
                c.colour(((0.95, 0.95, 0.95),), jitter=0.03))
    tx = torch.where(hx > 0.5, hx - w - c.u(0.08, 0.15), hx + w + c.u(0.08, 0.15))
    c.tree(tx, ground + 0.01, c.u(0.25, 0.4), c.u(0, 1) > 0.5, c.colour(GREENS))


def _still_life(c: _Canvas):
    table = c.u(0.6, 0.72)
    wall = c.colour(((0.8, 0.7, 0.5), (0.3, 0.45, 0.3), (0.2, 0.35, 0.55), (0.7, 0.35, 0.2)))
    c.fill(wall - 0.35 * c.ramp(0.0, 1.0) + 0.25 * (0.5 - c.disc(c.u(0.2, 0.8), 0.2, 0.0)).clamp(0, 0.5))
    wood = c.colour(((0.45, 0.05, -0.45), (0.2, -0.2, -0.55), (0.7, 0.4, -0.1)))
    grain = torch.sin(2 * math.pi * (c.y * c.u(25, 50) + 3 * c.noise(3, 12))) * 0.08
    c.paint(table - c.y, wood + grain + 0.1 * c.ramp(table, 1.0))
    c.paint((table + c.u(0.12, 0.2)) - c.y, wood - 0.35)  # the table's front edge, in shadow
    vx, vw, vh = c.u(0.2, 0.4), c.u(0.07, 0.11), c.u(0.14, 0.22)
    vase = c.colour(((0.2, 0.4, 0.8), (0.9, 0.9, 0.85), (0.8, 0.2, 0.1), (0.1, 0.6, 0.5)))
    body = (torch.hypot((c.x - vx) / vw, (c.y - (table - 0.7 * vw)) / (0.8 * vw)) - 1) * vw
    neck = c.box(vx, table - 1.3 * vw - 0.5 * vh, 0.35 * vw, 0.5 * vh)
    c.paint(c.disc(vx, table + 0.01, vw) + 0.5 * (c.y - table).abs(), c.colour(((-0.8, -0.8, -0.8),)), soft=6,
            opacity=0.5)
    shade = 0.5 * ((c.x - vx) / vw).clamp(-1, 1)
    c.paint(torch.minimum(body, neck), vase - shade)
    fruits = c.colour(((0.9, -0.6, -0.7), (0.95, 0.4, -0.8), (0.3, 0.7, -0.6), (0.95, 0.8, -0.5)))
    fx = vx + vw + c.u(0.08, 0.15)
    for k in range(3):
        r = c.u(0.04, 0.07)
        x0 = fx + k * c.u(0.09, 0.13)
        y0 = table + 0.02 * k - r + 0.01
        c.paint(c.disc(x0, table + 0.015 * k + 0.01, r) + 0.6 * (c.y - table - 0.015 * k).abs(),
                c.colour(((-0.8, -0.8, -0.8),)), soft=6, opacity=0.5)
        light = torch.hypot(c.x - x0 + 0.4 * r, c.y - y0 + 0.4 * r) / r
        c.paint(c.disc(x0, y0, r), fruits.roll(k, 0) + 0.3 - 0.5 * light)


def _window(c: _Canvas):
    floor = c.u(0.72, 0.85)
    wall = c.colour(((0.85, 0.8, 0.7), (0.5, 0.6, 0.45), (0.75, 0.55, 0.45), (0.55, 0.6, 0.75)))
    c.fill(c.texture(wall - 0.3 * c.ramp(0.0, floor), (64, 0.04)))
    seams = ((torch.frac(c.x * c.u(6, 12)) - 0.5).abs() > 0.465).float()
    wood = c.colour(((0.5, 0.15, -0.3), (0.25, -0.1, -0.45)))
    c.paint(floor - c.y, wood - 0.25 * seams + 0.2 * c.ramp(floor, 1.0))
    wx, wy, ww, wh = c.u(0.35, 0.65), c.u(0.3, 0.42), c.u(0.13, 0.22), c.u(0.15, 0.24)
    frame = c.colour(((0.95, 0.95, 0.95), (0.3, -0.1, -0.4)), jitter=0.04)
    c.paint(c.box(wx, wy, ww + 0.025, wh + 0.025), frame)
    pane = c.box(wx, wy, ww, wh)
    inside = (0.5 - pane * c.size).clamp(0, 1)
    palette = c.pick(2)
    top, low = c.colour(SKY_TOP, palette, 0.08), c.colour(SKY_LOW, palette, 0.08)
    c.blend(inside, top + (low - top) * c.ramp(wy - wh, wy + wh))
    hill = torch.maximum(pane, wy + wh * c.u(0.2, 0.6) + 0.03 * torch.sin(c.x * c.u(8, 15)) - c.y)
    c.paint(hill, c.colour(GREENS))
    c.paint(torch.minimum(c.box(wx, wy, ww, 0.01), c.box(wx, wy, 0.01, wh)), frame)
    cloth = c.colour(((0.8, -0.3, -0.4), (-0.2, -0.1, 0.6), (0.3, 0.6, 0.3), (0.9, 0.8, 0.5)))
    folds = 0.2 * torch.sin(c.x * c.u(80, 120))
    for side in (-1, 1):
        c.paint(c.box(wx + side * (ww + 0.02), wy + 0.03, 0.06, wh + 0.09), cloth + folds)
    light = torch.maximum(c.box(wx + 0.5 * (c.y - floor), floor + 0.08, ww, 0.05), floor - c.y)
    c.paint(light, c.colour(((1.0, 0.95, 0.7),), jitter=0.02), soft=5, opacity=0.3)


def _flowers(c: _Canvas):
    top = c.u(-0.1, 0.25)
    c.sky(top.clamp(min=0.02), c.pick(2), clouds=0.3)
    c.paint(top - c.y, c.texture(c.colour(GREENS) - 0.35 * c.ramp(top, 1.0), (96, 0.2), (24, 0.2), (6, 0.15)))
    petal = ((0.95, -0.7, -0.6), (0.95, 0.5, 0.8), (0.95, 0.85, -0.3), (0.95, 0.95, 0.95), (0.3, -0.3, 0.85))
    for k in range(5):
        fx, fy, r = c.u(0.1, 0.9), c.u(0.25, 0.75), c.u(0.05, 0.1)
        c.paint(torch.maximum((c.x - fx - 0.02 * torch.sin(c.y * 12)).abs() - 0.006, fy - c.y),
                c.colour(((-0.4, 0.1, -0.6),)))
        dx, dy = c.x - fx, c.y - fy
        petals = torch.randint(5, 9, (c.n, 1, 1, 1), generator=c.gen, device=c.device).float()
        angle = torch.atan2(dy, dx) + c.u(0, 6.3)
        c.paint(torch.hypot(dx, dy) - r * (0.45 + 0.55 * torch.cos(petals * angle / 2).abs()), c.colour(petal))
        c.paint(c.disc(fx, fy, 0.28 * r), c.colour(((0.95, 0.7, -0.6), (0.3, -0.2, -0.6))))


def _face(c: _Canvas):
    back = c.colour(((0.3, 0.6, 0.9), (0.6, 0.9, 0.6), (0.95, 0.6, 0.7), (0.6, 0.5, 0.9), (0.2, 0.2, 0.25)),
                    jitter=0.25)
    c.fill(back - 0.3 * c.ramp(0.0, 1.0))
    cx, cy, r = c.u(0.4, 0.6), c.u(0.4, 0.6), c.u(0.25, 0.36)
    ink = c.colour(((-0.85, -0.85, -0.8),), jitter=0.05)
    c.paint(c.disc(cx, cy, r + 0.015), ink)
    skin = c.colour(((1.0, 0.85, -0.2), (0.95, 0.6, 0.3), (0.9, 0.7, 0.5)))
    light = torch.hypot(c.x - cx + 0.3 * r, c.y - cy + 0.3 * r) / r
    c.paint(c.disc(cx, cy, r), skin + 0.1 - 0.2 * light)
    for side in (-1, 1):
        ex, ey = cx + side * 0.35 * r, cy - 0.22 * r
        c.paint((torch.hypot((c.x - ex) / 0.11, (c.y - ey) / 0.17) - r) * 0.11, ink)
        c.paint(c.disc(ex - 0.03 * r, ey - 0.06 * r, 0.035 * r), c.colour(((1.0, 1.0, 1.0),), jitter=0.0))
        c.paint(c.disc(cx + side * 0.55 * r, cy + 0.2 * r, 0.13 * r), c.colour(((1.0, 0.3, 0.3),)), soft=8,
                opacity=0.5)
    ring = torch.hypot(c.x - cx, c.y - cy) - 0.55 * r
    smile = torch.maximum(torch.where(c.u(0, 1) > 0.5, ring.abs() - 0.05 * r, ring), cy + 0.12 * r - c.y)
    c.paint(smile, ink)


def _fields(c: _Canvas):
    horizon = c.u(0.25, 0.42)
    c.sky(horizon, c.pick(2))
    k = 6
    seeds_x = torch.rand(c.n, k, 1, 1, generator=c.gen, device=c.device) * 1.4 - 0.2
    seeds_y = torch.rand(c.n, k, 1, 1, generator=c.gen, device=c.device)
    depth = ((c.y - horizon) / (1 - horizon)).clamp(min=0)  # 0 at the horizon, 1 at the bottom
    cell = torch.hypot(c.x - seeds_x, 2.5 * (depth - seeds_y)).argmin(dim=1, keepdim=True)
    crops = torch.tensor(((-0.3, 0.3, -0.55), (0.8, 0.65, -0.3), (0.3, 0.0, -0.4), (-0.45, 0.05, -0.6),
                          (0.6, 0.75, -0.2)), device=c.device)
    palette = crops[torch.randint(0, 5, (c.n, k), generator=c.gen, device=c.device)]  # (n, k, 3)
    colour = palette.gather(1, cell.view(c.n, -1, 1).expand(-1, -1, 3)).transpose(1, 2).reshape(c.img.shape)
    rows = torch.randint(8, 30, (c.n, k), generator=c.gen, device=c.device).float() * \
        (torch.rand(c.n, k, generator=c.gen, device=c.device) > 0.3)
    freq = rows.gather(1, cell.view(c.n, -1)).view(c.n, 1, c.size, c.size)
    stripes = torch.sin(freq * (c.x - c.u(0.3, 0.7)) / (depth + 0.05)) * (0.15 * depth + 0.05)
    c.paint(horizon - c.y, colour + stripes - 0.25 * (1 - c.ramp(horizon, 1.0)))
    for i in range(3):  # hedge trees along the horizon
        c.tree(c.u(0.05, 0.95), horizon + 0.01, c.u(0.05, 0.1), c.u(0, 1) > 0.7, c.colour(GREENS) - 0.2)


def _beach(c: _Canvas):
    horizon = c.u(0.35, 0.5)
    palette = c.sky(horizon)
    shore = horizon + c.u(0.2, 0.3) + 0.02 * torch.sin(c.x * c.u(6, 12) + c.u(0, 6.3))
    sea = c.colour(((-0.7, -0.1, 0.4), (-0.5, 0.2, 0.4), (-0.3, -0.2, 0.1)))
    waves = c.texture(sea + 0.4 * c.ramp(horizon, 1.0), (40, 6, 0.2), (96, 12, 0.15))
    c.paint(horizon - c.y, waves)
    c.paint((shore - c.y).abs() - 0.008, c.colour(((0.95, 0.95, 0.95),), jitter=0.03))
    sand = c.colour(((0.85, 0.7, 0.35), (0.9, 0.8, 0.6)))
    c.paint(shore + 0.006 - c.y, c.texture(sand - 0.1 * c.ramp(shore, 1.0), (128, 0.12), (16, 0.12)))
    c.paint(c.disc(c.u(0.1, 0.9), horizon - c.u(0.05, 0.25), c.u(0.03, 0.06)),
            c.colour(((1.0, 0.95, 0.5),), jitter=0.05), opacity=(palette != GREY).float().view(-1, 1, 1, 1))
    bx, by, s = c.u(0.2, 0.8), horizon + c.u(0.03, 0.08), c.u(0.03, 0.06)  # a sailing boat
    hull = torch.maximum((c.y - by).abs() - 0.2 * s, (c.x - bx).abs() - s + 0.8 * (c.y - by + 0.2 * s))
    c.paint(hull, c.colour(((-0.3, -0.5, -0.6), (0.8, -0.5, -0.5))))
    deck = by - 0.25 * s
    sail = torch.maximum(torch.maximum(bx - c.x, c.y - deck), ((c.x - bx) / 0.9 + (deck - c.y) / 2.2 - s) * 0.8)
    c.paint(sail, c.colour(((0.95, 0.95, 0.9),), jitter=0.03))


def _night_city(c: _Canvas):
    top, low = c.colour(((-0.9, -0.9, -0.55),), jitter=0.08), c.colour(((-0.4, -0.55, -0.3), (-0.2, -0.6, -0.5)))
    c.fill(top + (low - top) * c.ramp(0.0, 1.0))
    stars = (torch.rand(c.n, 1, c.size, c.size, generator=c.gen, device=c.device) > 0.997).float()
    c.blend(stars * 0.8, c.colour(((1.0, 1.0, 0.9),), jitter=0.0))
    mx, my, mr = c.u(0.1, 0.9), c.u(0.1, 0.3), c.u(0.04, 0.07)
    c.paint(torch.maximum(c.disc(mx, my, mr), -c.disc(mx + c.u(0.3, 1.0) * mr, my - 0.3 * mr, mr)),
            c.colour(((0.95, 0.95, 0.8),), jitter=0.03))
    k = 9
    widths = torch.rand(c.n, k, generator=c.gen, device=c.device) + 0.5
    edges = (widths.cumsum(1) / widths.sum(1, keepdim=True)).contiguous()
    column = torch.searchsorted(edges, c.x.reshape(1, -1).expand(c.n, -1).contiguous()).clamp(max=k - 1)
    heights = torch.rand(c.n, k, generator=c.gen, device=c.device) * 0.45 + 0.35
    skyline = heights.gather(1, column).view(c.n, 1, 1, c.size)
    building = c.colour(((-0.75, -0.75, -0.7), (-0.6, -0.65, -0.7)), jitter=0.05)
    c.paint(skyline - c.y, building + 0.1 * (column % 2).view(c.n, 1, 1, c.size))
    gx, gy = c.u(35, 55), c.u(25, 40)
    grid = ((torch.frac(c.x * gx) - 0.5).abs() < 0.22) & ((torch.frac(c.y * gy) - 0.5).abs() < 0.25)
    lit = torch.rand(c.n, 1, 48, 64, generator=c.gen, device=c.device) > 0.55
    lit = F.interpolate(lit.float(), size=(c.size, c.size), mode="nearest") > 0.5
    windows = (grid & lit & (c.y > skyline + 0.02)).float()
    c.blend(windows, c.colour(((1.0, 0.85, 0.3), (0.95, 0.95, 0.7))))


def _forest(c: _Canvas):
    ground = c.u(0.55, 0.7)
    c.sky(ground, c.pick(2))
    line = c.ridge(ground - c.u(0.05, 0.12), 0.06, [((6, 12), 0.6), ((15, 30), 0.4)])
    c.paint(line - c.y, c.texture(c.colour(GREENS) - 0.3, (32, 0.15)))
    c.paint(ground - c.y, c.texture(c.colour(((-0.2, 0.1, -0.5), (0.0, -0.1, -0.4))), (96, 0.2), (12, 0.2)))
    conifer = c.u(0, 1) > 0.5
    for k in range(6):
        h = c.u(0.2, 0.3) + 0.06 * k
        c.tree(c.u(0.05, 0.95), ground + 0.04 * k * c.u(0.5, 1.0), h, conifer | (c.u(0, 1) > 0.7),
               c.colour(GREENS) - 0.1 * (5 - k) / 5)


# Pictures painted together: a few at a time keep a canvas's fields in the CPU's cache (about 1.5x faster).
SCENE_CHUNK = 8
SCENES = (_mountains, _house, _still_life, _window, _flowers, _face, _fields, _beach, _night_city, _forest)


def sample_scenes(n: int, generator: torch.Generator, size: int = 256, labels: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """(images (n, 3, size, size) float32 in [-1, 1], labels (n,) long in [0, len(SCENE_NAMES))).

    Like sample_batch, for the scenes; drawn on the generator's device. Every kind is drawn for its own
    pictures only, SCENE_CHUNK at a time, and a random half of the pictures is mirrored left to right.
    """
    gen, device = generator, generator.device
    drawn = torch.randint(0, len(SCENES), (n,), generator=gen, device=device)
    labels = drawn if labels is None else torch.as_tensor(labels, dtype=torch.long, device=device).reshape(n)
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(SCENES)):
        raise ValueError(f"labels must lie in [0, {len(SCENES)})")
    images = torch.empty(n, 3, size, size, device=device)
    for kind, draw in enumerate(SCENES):
        for index in (labels == kind).nonzero().view(-1).split(SCENE_CHUNK):
            if not index.numel():
                continue
            canvas = _Canvas(gen, index.numel(), size)
            draw(canvas)
            images[index] = canvas.img
    flip = torch.rand(n, generator=gen, device=device) < 0.5
    images[flip] = images[flip].flip(-1)
    return images.clamp_(-1, 1), labels


@dataclass(frozen=True)
class Dataset:
    names: tuple                # class names, by class id
    sample: Callable            # (n, generator, size=..., labels=None) -> (images, labels)


DATASETS = {"shapes": Dataset(CLASS_NAMES, sample_batch), "scenes": Dataset(SCENE_NAMES, sample_scenes)}


def dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown procedural data set {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]

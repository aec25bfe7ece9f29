"""Procedural class-conditioned images for training the reference DiT (no PIL, no data files).

    images, labels = sample_batch(16, torch.Generator().manual_seed(0))   # (16, 3, 64, 64) in [-1, 1]

Ten classes (CLASS_NAMES), each a shape or a pattern drawn as a signed distance field
(SDF) with a soft, anti-aliased edge, at a random position, size, rotation and colour,
over a flat, linear-gradient or low-frequency-noise background. Shapes carry a mild
colour texture and every pixel a little noise. So every image has large smooth regions
and sharp edges, the two cases that token merging has to tell apart.

Everything is batched torch on the CPU and drawn only from the given torch.Generator,
so a seed gives the same batch on every machine and torch build that share the CPU RNG.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

CLASS_NAMES = ("circle", "square", "triangle", "ring", "horizontal stripes", "vertical stripes",
               "checkerboard", "cross", "two blobs", "polka dots")
NUM_CLASSES = len(CLASS_NAMES)


def _u(gen: torch.Generator, n: int, lo: float, hi: float, *shape) -> Tensor:
    """Uniform (n, *shape) in [lo, hi), broadcastable against (n, H, W) when shape is ()."""
    x = torch.rand((n, *shape), generator=gen) * (hi - lo) + lo
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

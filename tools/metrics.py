"""Image metrics for the evidence tables: PSNR, SSIM and KID on a fixed random-feature extractor.

Images are (N, C, H, W) tensors in [-1, 1] (the reference model's range). What each metric can tell:

- PSNR (`psnr`, from tools.reference_dit): pixel fidelity to a reference image, here the unpatched
  model's image of the same seed and class. High PSNR means "the method changed little"; it does
  not say whether a changed image is worse, and it punishes a harmless shift as hard as damage.
- SSIM (`ssim`): structural fidelity to the same reference (local means, contrast and correlation
  in 11x11 Gaussian windows). Less sensitive than PSNR to small uniform shifts, more to lost edges
  and texture. Same caveat: fidelity, not quality.
- KID (`kid`): a distribution-level score: the unbiased squared MMD, with the cubic polynomial
  kernel, between the feature sets of two sets of images, averaged over random subsets (as in
  Binkowski et al. 2018, and torch-fidelity / clean-fid). No pretrained network can be downloaded
  here, so the features come from `RandomFeatures`: a fixed, seeded random conv net defined below,
  with band-pass features at 1, 2, 4 and 8 px (among them the token scale of a patch-4 model).
  Random conv features respond to colour, contrast, edges and texture statistics at several
  scales; they know nothing about object semantics, so KID here detects distribution shift
  (blur, colour casts, blockiness, per-token noise) but not "wrong object". KID is unbiased, so two
  samples of the same distribution give about 0 (it can be slightly negative); with a few dozen
  images it is noisy (compare `kid_std`), it needs a few hundred per set to separate methods whose
  scores differ by less than about 1e-3.
- Token artifact ratio (`token_artifact_ratio`): per-token colour noise, against the unpatched
  image of the same seed and class. Each image is averaged over its patch x patch token cells (the
  colour each token carries); its token-scale energy is the mean squared deviation of each token's
  colour from the mean of its 3x3 token neighbourhood (interior tokens). The ratio of a patched
  image's energy to its unpatched image's (plus one 8-bit level squared on both, so that a flat
  unpatched image does not turn invisible residue into a huge ratio) is 1 for equal token-scale
  detail, above 1 when tokens carry their own colour (merging that leaves per-token residue), below
  1 for blur. Summarised over images by the median or the mean (`token_artifact_ratios` gives each
  image's); the mean is the stricter, since noise in a few flat images dominates it.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tools.reference_dit import psnr  # noqa: F401  (one home for PSNR; re-exported here)

__all__ = ["psnr", "ssim", "ssim_per_image", "RandomFeatures", "mmd2_unbiased", "kid", "token_energy",
           "token_artifact_ratios", "token_artifact_ratio"]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


# ---- SSIM ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _gaussian_1d(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return g / g.sum()


def ssim_per_image(a: Tensor, b: Tensor, data_range: float = 2.0, window: int = SSIM_WINDOW,
                   sigma: float = SSIM_SIGMA) -> Tensor:
    """SSIM of each image pair, shape (N,): Wang et al. 2004 with a Gaussian window (11, sigma 1.5),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = data_range; computed per channel on the 'valid' windows
    (no padding) and averaged over channels and positions. Images are clamped to [-1, 1]."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    if min(a.shape[-2:]) < window:
        raise ValueError(f"ssim: images of {tuple(a.shape[-2:])} px are smaller than the {window}px window")
    x, y = (t.detach().double().clamp(-1, 1) for t in (a, b))
    c = x.shape[1]
    g = _gaussian_1d(window, sigma).to(x.device)
    gh, gw = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t):  # separable depthwise Gaussian, valid windows only
        return F.conv2d(F.conv2d(t, gh, groups=c), gw, groups=c)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def ssim(a: Tensor, b: Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM over the image pairs (1.0 for identical images)."""
    return float(ssim_per_image(a, b, data_range).mean())


# ---- token-scale artifacts ---------------------------------------------------------------------------

def token_energy(images: Tensor, patch: int) -> Tensor:
    """(N,) token-scale energy of each image: the mean squared deviation of each token's mean colour
    (mean over its patch x patch pixels) from the mean of its 3x3 token neighbourhood (centre
    included), over the interior tokens and the channels. Images are clamped to [-1, 1]."""
    if images.ndim != 4:
        raise ValueError(f"token_energy needs (N, C, H, W) images, got {tuple(images.shape)}")
    patch = int(patch)
    if patch < 1 or min(images.shape[-2:]) < 3 * patch:
        raise ValueError(f"token_energy: images of {tuple(images.shape[-2:])} px have fewer than 3x3 tokens "
                         f"of {patch} px")
    tokens = F.avg_pool2d(images.detach().double().clamp(-1, 1), patch)   # (N, C, h, w) token colours
    neighbourhood = F.avg_pool2d(tokens, 3, stride=1)                      # interior tokens only
    return (tokens[..., 1:-1, 1:-1] - neighbourhood).pow(2).flatten(1).mean(1)


TOKEN_ENERGY_FLOOR = (2.0 / 255.0) ** 2   # one 8-bit level in [-1, 1], squared: deviations below it are invisible


def token_artifact_ratios(patched: Tensor, unpatched: Tensor, patch: int, eps: float = TOKEN_ENERGY_FLOOR) -> Tensor:
    """(N,) (token_energy(patched) + eps) / (token_energy(unpatched) + eps), image by image (same seed
    and class). `eps` (one 8-bit level, squared) keeps a flat unpatched image from turning invisible
    residue into a huge ratio."""
    if patched.shape != unpatched.shape:
        raise ValueError(f"token_artifact_ratios needs two image sets of one shape, got {tuple(patched.shape)} "
                         f"and {tuple(unpatched.shape)}")
    return (token_energy(patched, patch) + eps) / (token_energy(unpatched, patch) + eps)


def token_artifact_ratio(patched: Tensor, unpatched: Tensor, patch: int, reduce: str = "median") -> float:
    """Token-scale artifact ratio of a set of images against their unpatched images: the median
    (`reduce` "median") or mean ("mean") of the per-image ratios. 1: the unpatched token-scale
    detail; above 1: per-token noise; below 1: blur."""
    r = token_artifact_ratios(patched, unpatched, patch)
    if reduce == "median":
        return float(r.quantile(0.5))
    if reduce == "mean":
        return float(r.mean())
    raise ValueError(f"reduce must be 'median' or 'mean', got {reduce!r}")


# ---- random-feature extractor ----------------------------------------------------------------------

class RandomFeatures:
    """A fixed, seeded random conv net: the project's own feature extractor for KID.

    Image features: four stages of conv 3x3 (padding 1, He-normal weights N(0, 2 / fan_in) from
    torch.Generator(seed), zero bias) + ReLU + 2x2 average pool, widths 32, 64, 128, 256; the
    spatial mean and standard deviation of every channel after each stage's ReLU (2 x 480 = 960
    dims): colour and local contrast at 1 px, edges and textures at 2-8 px.

    Band features, one set per scale s in `scales` (default 1, 2, 4, 8 px): the image averaged over
    s x s cells, minus the mean of each cell's 3x3 cell neighbourhood (a band-pass at scale s: what
    each cell carries that its neighbours do not), times `band_gain`, then one conv 3x3 (32 wide,
    He-normal, drawn after the image weights) + ReLU, spatial mean and std (64 dims per scale). They
    make KID see noise at one scale, such as every 4x4-pixel token of a patch-4 model carrying its
    own colour: the image features alone hardly move for it (their global statistics are dominated
    by the picture's colours and large edges), the band at the token's scale is near zero on smooth
    content and grows with the noise. `band_gain` 4 gives the band features a norm comparable to
    the image features' on the reference model's images (about 4.7 against 6.1).

    Input: images in [-1, 1] of any size >= 16 px (pooled globally, so no resizing); compare sets
    of one size only. Deterministic for a given seed (float32, CPU or GPU).
    """

    WIDTHS = (32, 64, 128, 256)
    BAND_WIDTH = 32

    def __init__(self, seed: int = 0, channels: int = 3, device=None, scales: tuple = (1, 2, 4, 8),
                 band_gain: float = 4.0):
        gen = torch.Generator().manual_seed(seed)
        self.weights = []
        c_in = channels
        for c_out in self.WIDTHS:
            fan_in = c_in * 9
            w = torch.randn(c_out, c_in, 3, 3, generator=gen) * math.sqrt(2.0 / fan_in)
            self.weights.append(w.to(device))
            c_in = c_out
        self.scales = tuple(int(s) for s in scales)
        self.band_gain = float(band_gain)
        self.band_weights = [(torch.randn(self.BAND_WIDTH, channels, 3, 3, generator=gen)
                              * math.sqrt(2.0 / (channels * 9))).to(device) for _ in self.scales]
        self.dim = 2 * sum(self.WIDTHS) + 2 * self.BAND_WIDTH * len(self.scales)

    @staticmethod
    def band(images: Tensor, scale: int) -> Tensor:
        """Band-pass at `scale` px: the s x s cell means minus the mean of their 3x3 cell neighbourhood."""
        cells = F.avg_pool2d(images, scale) if scale > 1 else images
        return cells - F.avg_pool2d(cells, 3, stride=1, padding=1, count_include_pad=False)

    @torch.inference_mode()
    def __call__(self, images: Tensor, batch: int = 64) -> Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, dim) float64 features."""
        out = []
        for chunk in images.split(batch):
            x = image = chunk.detach().float().clamp(-1, 1).to(self.weights[0].device)
            feats = []
            for i, w in enumerate(self.weights):
                if i:
                    x = F.avg_pool2d(x, 2)
                x = F.relu(F.conv2d(x, w, padding=1))
                feats += [x.mean((2, 3)), x.std((2, 3))]
            for s, w in zip(self.scales, self.band_weights):
                y = F.relu(F.conv2d(self.band_gain * self.band(image, s), w, padding=1))
                feats += [y.mean((2, 3)), y.std((2, 3))]
            out.append(torch.cat(feats, 1).double().cpu())
        return torch.cat(out)


# ---- KID -------------------------------------------------------------------------------------------

def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased squared MMD between feature sets x (m, d), y (m, d) with k(a, b) = (a.b / d + 1)^3."""
    m = x.shape[0]
    if m < 2 or y.shape[0] != m:
        raise ValueError(f"mmd2_unbiased needs two sets of equal size >= 2, got {x.shape[0]} and {y.shape[0]}")
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    off = m * (m - 1)
    return float((kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off
                 - 2.0 * kxy.mean())


def kid(feats_a: Tensor, feats_b: Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets) between two feature sets, e.g. from RandomFeatures.

    Each of `subsets` draws takes min(subset_size, len(a), len(b)) rows of each set without
    replacement (seeded) and computes the unbiased MMD^2. The std shows how noisy the mean is.
    """
    n = min(subset_size, feats_a.shape[0], feats_b.shape[0])
    if n < 2:
        raise ValueError("kid needs at least 2 feature rows in each set")
    gen = torch.Generator().manual_seed(seed)
    a, b = feats_a.double(), feats_b.double()
    vals = []
    for _ in range(subsets):
        ia = torch.randperm(a.shape[0], generator=gen)[:n]
        ib = torch.randperm(b.shape[0], generator=gen)[:n]
        vals.append(mmd2_unbiased(a[ia], b[ib]))
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(vals) > 1 else 0.0

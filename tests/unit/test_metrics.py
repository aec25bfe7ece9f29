"""tools/metrics.py: PSNR, SSIM, the random-feature extractor and KID."""
from __future__ import annotations

import math

import pytest
import torch

from tools import metrics as M


def _images(n=6, size=32, seed=0):
    """Smooth random images in [-1, 1]: blurred noise, so SSIM's windows see structure."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size // 4, size // 4, generator=gen)
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False).tanh()


def test_identical_images():
    a = _images()
    assert M.psnr(a, a) == math.inf
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(M.ssim_per_image(a, a), torch.ones(len(a), dtype=torch.float64))
    f = M.RandomFeatures()(_images(32, seed=5))
    # Unbiased MMD^2 of a set with itself is 2/m (mean off-diagonal - mean diagonal kernel) <= 0, and small
    # (its size grows with the features' spread: these images carry structure at the token scale, which the
    # band features see).
    k_self, _ = M.kid(f, f, subsets=10, subset_size=16)
    k_shift, _ = M.kid(f, M.RandomFeatures()((_images(32, seed=5) + 0.3).clamp(-1, 1)), subsets=10, subset_size=16)
    assert -1e-3 < k_self <= 0.0 and k_shift > 20 * abs(k_self), (k_self, k_shift)


def test_psnr_and_ssim_fall_with_noise():
    a = _images()
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(a.shape, generator=gen)
    psnrs, ssims = [], []
    for level in (0.01, 0.05, 0.2, 0.5):
        b = a + level * noise
        psnrs.append(M.psnr(a, b))
        ssims.append(M.ssim(a, b))
    assert all(x > y for x, y in zip(psnrs, psnrs[1:])), psnrs
    assert all(x > y for x, y in zip(ssims, ssims[1:])), ssims
    assert ssims[0] > 0.95 and ssims[-1] < 0.6, ssims
    # PSNR is 10 log10(peak^2 / MSE) with peak 2 for [-1, 1]: check against a direct computation.
    b = (a + 0.05 * noise).clamp(-1, 1)
    mse = (a - b).double().pow(2).mean().item()
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(4.0 / mse), rel=1e-9)


def test_ssim_matches_direct_formula_on_one_window():
    """An 11x11 image has exactly one valid window: SSIM equals the closed form with Gaussian weights."""
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(1, 1, 11, 11, generator=gen) * 2 - 1
    b = (a + 0.3 * torch.randn(1, 1, 11, 11, generator=gen)).clamp(-1, 1)
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    w = torch.outer(g, g)
    w = w / w.sum()
    x, y = a[0, 0].double(), b[0, 0].double()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * x * x).sum() - mx ** 2, (w * y * y).sum() - my ** 2
    cxy = (w * x * y).sum() - mx * my
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert M.ssim(a, b) == pytest.approx(float(expected), rel=1e-9)


def test_ssim_rejects_bad_input():
    with pytest.raises(ValueError):
        M.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError):
        M.ssim(torch.zeros(1, 3, 16, 16), torch.zeros(2, 3, 16, 16))


def test_features_deterministic_and_seeded():
    a = _images(4)
    f1, f2 = M.RandomFeatures(seed=0), M.RandomFeatures(seed=0)
    x = f1(a)
    assert x.shape == (4, f1.dim) and x.dtype == torch.float64 and torch.isfinite(x).all()
    assert torch.equal(x, f2(a))
    assert torch.equal(x, torch.cat([f1(a[:2]), f1(a[2:])]))  # batching does not matter
    assert not torch.allclose(x, M.RandomFeatures(seed=1)(a))
    assert (x.std(0) > 0).sum() > f1.dim // 2  # features vary across images


def test_kid_near_zero_for_same_distribution_and_grows_with_shift():
    ext = M.RandomFeatures()
    base = ext(_images(48, seed=10))
    same = ext(_images(48, seed=11))
    kid_same, std_same = M.kid(base, same, subsets=50, subset_size=32)
    results = [kid_same]
    for shift in (0.2, 0.5):  # a colour/brightness shift of the whole distribution
        shifted = ext((_images(48, seed=11) + shift).clamp(-1, 1))
        results.append(M.kid(base, shifted, subsets=50, subset_size=32)[0])
    blurred = ext(torch.nn.functional.avg_pool2d(_images(48, seed=11), 4, 1, padding=0))
    assert abs(kid_same) < 3 * std_same + 1e-4, (kid_same, std_same)
    assert results[0] < results[1] < results[2], results
    assert results[1] > 10 * max(abs(kid_same), std_same)
    assert blurred.shape[0] == 48 and M.kid(base, blurred, subsets=20, subset_size=32)[0] > abs(kid_same)
    # Deterministic for a fixed seed; subset draws change with it.
    assert M.kid(base, same, subsets=5, subset_size=16, seed=3) == M.kid(base, same, subsets=5, subset_size=16, seed=3)


def test_mmd_unbiased_matches_definition():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3
    m = 5
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert M.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    with pytest.raises(ValueError):
        M.mmd2_unbiased(x[:1], y[:1])


# ---- token-scale artifacts --------------------------------------------------------------------------

def _smooth(n=16, size=64, seed=0, grid=4):
    """Smooth images in [-1, 1] whose structure is far larger than a token (bicubic from a grid x grid
    field): like the reference model's images, little colour changes from one 4x4 token to the next."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, grid, grid, generator=gen)
    return torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False).tanh()


def _token_noise(images, patch, strength, seed=1):
    """Every patch x patch token gets its own random colour offset (std `strength`), as merging leaves it."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = images.shape
    offset = torch.randn(n, c, h // patch, w // patch, generator=gen) * strength
    return (images + offset.repeat_interleave(patch, 2).repeat_interleave(patch, 3)).clamp(-1, 1)


def test_token_artifact_ratio_sees_per_token_noise_and_blur():
    a = _smooth()
    assert M.token_artifact_ratio(a, a, 4) == pytest.approx(1.0) == M.token_artifact_ratio(a, a, 4, "mean")
    # A colour shift of the whole image is not token-scale detail.
    assert M.token_artifact_ratio((a * 0.8 + 0.1), a * 0.8, 4) == pytest.approx(1.0, rel=1e-6)
    ratios = [M.token_artifact_ratio(_token_noise(a, 4, s), a, 4) for s in (0.02, 0.05, 0.1, 0.2)]
    assert all(x < y for x, y in zip(ratios, ratios[1:])), ratios
    assert ratios[0] < 1.25 < ratios[1] and ratios[2] > 2.0, ratios  # 0.05 per token (32 dB) already counts
    # Pixel noise that averages out inside each token hardly counts; blur counts below 1.
    gen = torch.Generator().manual_seed(2)
    pixel = (a + 0.05 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
    assert M.token_artifact_ratio(pixel, a, 4) < 1.25
    blurred = torch.nn.functional.avg_pool2d(a, 9, 1, 4, count_include_pad=False)
    assert M.token_artifact_ratio(blurred, a, 4) < 0.8
    # Per image: only the noisy images rise.
    mixed = torch.cat([_token_noise(a[:8], 4, 0.1), a[8:]])
    r = M.token_artifact_ratios(mixed, a, 4)
    assert r.shape == (16,) and (r[:8] > 2).all() and torch.allclose(r[8:], torch.ones(8, dtype=r.dtype))
    with pytest.raises(ValueError):
        M.token_artifact_ratios(a[:2], a[:3], 4)
    with pytest.raises(ValueError):
        M.token_energy(a, 32)  # fewer than 3x3 tokens


def test_kid_sees_per_token_noise_at_the_token_scale():
    """Per-token noise of visible strength (std 0.1 per 4x4-pixel token, about 26 dB) moves KID far above its
    noise floor; another unpatched-like set stays at the floor. The band features do it: the image features
    alone (scales=()) leave that noise inside the floor."""
    base, other = _smooth(48, seed=10), _smooth(48, seed=11)
    noisy = _token_noise(other, 4, 0.1)
    ext = M.RandomFeatures()
    assert ext(base).shape == (48, ext.dim) and ext.dim == 960 + 4 * 64
    fb = ext(base)
    floor, floor_std = M.kid(fb, ext(other), subsets=50, subset_size=32)
    k_noisy, _ = M.kid(fb, ext(noisy), subsets=50, subset_size=32)
    assert abs(floor) < 3 * floor_std + 1e-4, (floor, floor_std)
    assert k_noisy > 10 * max(abs(floor), floor_std), (k_noisy, floor, floor_std)
    image_only = M.RandomFeatures(scales=())
    fi = image_only(base)
    floor_i, std_i = M.kid(fi, image_only(other), subsets=50, subset_size=32)
    k_i, _ = M.kid(fi, image_only(noisy), subsets=50, subset_size=32)
    assert k_i - floor_i < 3 * std_i, (k_i, floor_i, std_i)

"""kernels.detail_cache: merged calls keep the coarse part of their own prediction and take the fine,
per-token part from the row's last full call."""
import pytest
import torch

from kernels.runtime import CallInfo
from kernels.detail_cache import DetailCache, low_pass
from kernels.density import DensityConfig, DensitySchedule
from kernels.sdtm import SDTM, SDTMConfig

PATCH, WINDOW = 2, 2


def _call(reduced: bool, rows: tuple) -> CallInfo:
    return CallInfo(grid=(4, 4), n_img=16, n_txt=0, progress=0.5, sigma=0.5, rows=rows, reduced=reduced, patch=PATCH)


def _run(cache, state, noise, reduced, rows):
    return cache.end_call(state, _call(reduced, rows), noise)


def _checker(shape, period: int) -> torch.Tensor:
    """+1/-1 in period x period squares on the last two axes: no energy below the window scale."""
    h, w = shape[-2:]
    ii = torch.arange(h)[:, None] // period
    jj = torch.arange(w)[None, :] // period
    return ((ii + jj) % 2 * 2 - 1).float().expand(shape).clone()


def test_low_pass_keeps_constants_and_removes_token_scale_detail():
    c = torch.full((2, 3, 8, 8), 0.7)
    assert torch.allclose(low_pass(c, 4), c)
    fine = _checker((2, 3, 8, 8), 2)  # alternates every 2 px: averages to 0 over 4 x 4 windows
    assert low_pass(fine, 4).abs().max() < 1e-6


def test_low_pass_on_video_is_per_frame():
    frames = torch.arange(3.0).reshape(1, 1, 3, 1, 1).expand(2, 4, 3, 8, 8).clone()  # varies in time only
    assert torch.equal(low_pass(frames, 4), frames)
    assert low_pass(frames, 4).shape == frames.shape


def test_full_call_is_cached_and_reduced_call_takes_its_detail():
    cache, rows = DetailCache(WINDOW), ((None, 0, 0), (None, 1, 0))
    state = cache.new_run_state()
    full = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert _run(cache, state, full, False, rows) is None          # a full call passes through, cached
    assert set(state.rows) == set(rows) and state.peak_cache_bytes > 0
    coarse_shift = torch.full_like(full, 0.25)
    merged = full + coarse_shift + _checker(full.shape, 1)         # new coarse part, wrong fine detail
    out, computed = _run(cache, state, merged, True, rows)
    assert not computed.any()
    assert torch.allclose(out, full + coarse_shift, atol=1e-5)    # coarse from the merged call, detail cached


def test_rows_use_their_own_cache_whatever_their_order():
    cache = DetailCache(WINDOW)
    state = cache.new_run_state()
    a, b = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)
    _run(cache, state, torch.cat([a, b]), False, (("u", 0, 0), ("u", 1, 0)))
    out, _ = _run(cache, state, torch.cat([b, a]), True, (("u", 1, 0), ("u", 0, 0)))  # swapped rows
    assert torch.allclose(out, torch.cat([b, a]))


def test_nothing_cached_or_shape_changed_leaves_the_call_alone():
    cache = DetailCache(WINDOW)
    state = cache.new_run_state()
    rows = ((None, 0, 0),)
    assert _run(cache, state, torch.randn(1, 4, 8, 8), True, rows) is None   # no full call yet
    _run(cache, state, torch.randn(1, 4, 8, 8), False, rows)
    assert _run(cache, state, torch.randn(1, 4, 16, 8), True, rows) is None  # another latent size
    state.clear()
    assert not state.rows


@pytest.mark.parametrize("method", [SDTM(SDTMConfig(detail_cache=False)), DensitySchedule(DensityConfig(detail_cache=False))],
                         ids=["sdtm", "density"])
def test_switched_off_keeps_no_state(method):
    assert method.new_run_state() is None


def test_methods_cache_with_their_window():
    assert SDTM(SDTMConfig(window=3, ratio=0.5, deviation=0.1, detail_cache=True)).detail_cache.window == 3
    assert DensitySchedule(DensityConfig(stage_windows=(3, 2, 2, 1), detail_cache=True)).detail_cache.window == 3
    assert SDTM(SDTMConfig()).detail_cache is None  # opt-in

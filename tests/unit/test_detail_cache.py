"""kernels.detail_cache: merged calls keep the coarse part of their own prediction and take the fine,
per-token part from the row's last full call."""
import pytest
import torch

from kernels.runtime import CallInfo
from kernels.detail_cache import DetailCache, low_pass
from kernels.density import DensityConfig, DensitySchedule
from kernels.sdtm import SDTM, SDTMConfig

PATCH, WINDOW = 2, 2


def _call(rows: tuple) -> CallInfo:
    return CallInfo(grid=(4, 4), n_img=16, n_txt=0, progress=0.5, sigma=0.5, rows=rows, patch=PATCH)


def _run(cache, state, noise, reduced, rows):
    return cache.end_call(state, _call(rows), reduced, noise)


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
    assert SDTM(SDTMConfig(detail_cache=False)).detail_cache is None


def test_defaults_refresh_forecast_and_weigh_the_merged_call():
    for method in (SDTM(SDTMConfig()), DensitySchedule(DensityConfig())):
        c = method.detail_cache
        assert (c.refresh_every, c.forecast, c.weight, c.window) == (2, 0.5, 0.1, 3), method.name


def _step(cache, state, noise, sigma, reduced=None, rows=((None, 0, 0),)):
    """One model call at `sigma`: (whether the cache asked for a full call, end_call's result). `reduced` None:
    the call merged exactly when the cache did not ask for a full one."""
    call = CallInfo(grid=(4, 4), n_img=16, n_txt=0, progress=1 - sigma, sigma=sigma, rows=rows, patch=PATCH)
    full = cache.wants_full_call(state, call, noise)
    return full, cache.end_call(state, call, (not full) if reduced is None else reduced, noise)


def test_refresh_every_asks_for_a_full_step_after_n_merged_steps():
    cache = DetailCache(WINDOW, refresh_every=2)
    state = cache.new_run_state()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    full, _ = _step(cache, state, x, 1.0, reduced=True)
    assert full  # nothing cached yet: the first call runs in full
    _step(cache, state, x, 1.0, reduced=False)
    decided = [_step(cache, state, x, sigma)[0] for sigma in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)]
    assert decided == [False, False, True, False, False, True]
    # a rising sigma starts a new run: nothing cached, full again
    assert _step(cache, state, x, 1.0, reduced=True)[0]


def test_cond_and_uncond_called_one_by_one_are_one_step():
    cache = DetailCache(WINDOW, refresh_every=1)
    state = cache.new_run_state()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond, uncond = (("u", 0, 0),), (("u", 1, 0),)
    decided = []
    for sigma in (1.0, 0.9, 0.8, 0.7):
        for rows in (cond, uncond):
            call = CallInfo(grid=(4, 4), n_img=16, n_txt=0, progress=1 - sigma, sigma=sigma, rows=rows, patch=PATCH)
            full = cache.wants_full_call(state, call, x)
            cache.end_call(state, call, not full, x)  # a merged call when not asked for a full one
            decided.append(full)
    assert decided == [True, True, False, False, True, True, False, False]


def test_forecast_carries_the_cached_noise_along_the_trend_of_full_steps():
    """noise(sigma) = a + sigma * b: the first full step never starts a slope, the next two give b, and a
    merged call at sigma receives the last full noise moved by damping * b * (sigma - sigma_last)."""
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    wrong_first = torch.randn(1, 4, 8, 8, generator=gen)
    cache = DetailCache(WINDOW, weight=0.0, forecast=0.5)
    state = cache.new_run_state()
    _step(cache, state, wrong_first, 1.0, reduced=False)  # the run's first step: off any trend
    _step(cache, state, a + 0.9 * b, 0.9, reduced=False)
    out, _ = _step(cache, state, torch.zeros_like(a), 0.85, reduced=True)[1]
    assert torch.allclose(out, a + 0.9 * b)  # no slope yet: held
    _step(cache, state, a + 0.8 * b, 0.8, reduced=False)
    out, _ = _step(cache, state, torch.zeros_like(a), 0.7, reduced=True)[1]
    assert torch.allclose(out, a + 0.8 * b + 0.5 * (0.7 - 0.8) * b, atol=1e-5)


def test_forecast_holds_while_the_trend_mispredicts():
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    cache = DetailCache(WINDOW, weight=0.0, forecast=0.5)
    state = cache.new_run_state()
    for sigma in (1.0, 0.9, 0.8):
        _step(cache, state, a + sigma * b, sigma, reduced=False)
    jump = a + 0.8 * b + 5.0 * b  # the next full step goes against the trend
    _step(cache, state, jump, 0.7, reduced=False)
    out, _ = _step(cache, state, torch.zeros_like(a), 0.6, reduced=True)[1]
    assert torch.allclose(out, jump)


def test_weight_scales_the_merged_calls_coarse_difference():
    cache = DetailCache(WINDOW, weight=0.25)
    state = cache.new_run_state()
    full = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    _step(cache, state, full, 0.5, reduced=False)
    merged = full + 0.4 + _checker(full.shape, 1)  # coarse shift 0.4, wrong fine detail
    out, _ = _step(cache, state, merged, 0.4, reduced=True)[1]
    assert torch.allclose(out, full + 0.1, atol=1e-5)


def test_refresh_steps_run_every_block_unmerged():
    """On a tiny random reference DiT, 10 steps at the defaults merge in the merged steps of FFFmmFmmFm
    only, every block of them."""
    from kernels.runtime import RUNS_KEY
    from tools import reference_dit as R
    model = R.ReferenceDiT(R.DiTConfig(image_size=16, patch_size=2, hidden=32, heads=1, axes_dim=(8, 12, 12),
                                       depth_double=1, depth_single=1)).init_weights(0).eval()
    for method in (SDTM(SDTMConfig()), DensitySchedule(DensityConfig())):
        to = R.method_options(method, model, "m")
        R.sample(model, [0], steps=10, cfg=3.0, seed=0, transformer_options=to)
        stats = to[RUNS_KEY]["m"].stats
        assert stats.block_calls == 10 * 2 and stats.merged_calls == 5 * 2, (method.name, stats)


@pytest.mark.parametrize("config, label", [(SDTMConfig, "SDTM"), (DensityConfig, "Density")])
@pytest.mark.parametrize("bad, message", [
    (dict(refresh_every=-1), r"refresh_every must be >= 0, got -1"),
    (dict(forecast=1.5), r"forecast must lie in \[0, 1\], got 1.5"),
    (dict(detail_weight=-0.1), r"detail_weight must lie in \[0, 1\], got -0.1"),
])
def test_out_of_range_detail_settings_are_refused_with_the_setting_named(config, label, bad, message):
    with pytest.raises(ValueError, match=f"^{label}: {message}$"):
        config(**bad)
    config(**{k: 0 for k in bad})  # the edge of the range is allowed

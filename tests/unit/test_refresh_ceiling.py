"""tools/refresh_ceiling.py on a small random-init reference model: the oracle's parts are what they say."""
from __future__ import annotations

import pytest
import torch

from tools import reference_dit as R
from tools import refresh_ceiling as RC
from tools import step_cache as SC

CFG = R.DiTConfig(image_size=32, hidden=64, heads=2, axes_dim=(8, 12, 12), depth_double=1, depth_single=1)
LAYOUT, STEPS = SC.Layout(4, 3), 10

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return R.build_model(CFG, seed=0, weights=None)[0]


def sample(model, part=None):
    to = (SC.StepCache(LAYOUT) if part is None else RC.OracleRefresh(LAYOUT, part, model.patch_size)).options()
    return R.sample(model, [0, 1], steps=STEPS, cfg=3.0, seed=0, transformer_options=to)


def test_every_token_exact_is_the_unpatched_run_and_none_is_the_cache(model):
    unpatched = R.sample(model, [0, 1], steps=STEPS, cfg=3.0, seed=0)
    assert torch.allclose(sample(model, RC.exact_share(1.0, "random")), unpatched, atol=1e-5)
    assert torch.allclose(sample(model, RC.uniform_share(1.0)), unpatched, atol=1e-5)
    assert torch.equal(sample(model, RC.exact_share(0.0, "missed now")), sample(model))
    half = sample(model, RC.exact_share(0.5, "random"))
    assert not torch.allclose(half, unpatched, atol=1e-3) and not torch.equal(half, sample(model))


def test_exact_shares_keep_that_share_of_the_tokens_chosen_as_named():
    forecast, exact = torch.zeros(1, 16, 3), torch.arange(16.0).reshape(1, 16, 1).expand(1, 16, 3)
    worst = RC.exact_share(0.25, "missed now")(forecast, exact, (4, 4), 5, None)
    assert torch.equal(worst[0, :, 0].nonzero().flatten(), torch.tensor([12, 13, 14, 15]))
    missed = torch.zeros(1, 16).index_fill_(1, torch.tensor([0, 1, 2, 3]), 1.0)
    before = RC.exact_share(0.25, "missed before")(forecast, exact + 1, (4, 4), 5, missed)
    assert torch.equal(before[0, :, 0].nonzero().flatten(), torch.tensor([0, 1, 2, 3]))
    drawn = RC.exact_share(0.25, "random")(forecast, exact + 1, (4, 4), 5, None)
    assert int((drawn[0, :, 0] != 0).sum()) == 4


def test_the_forecasts_miss_at_a_full_step_is_recorded_for_the_next_skipped_ones(model):
    seen = []

    def part(forecast, exact, grid, step, missed):
        seen.append((step, None if missed is None else missed.clone()))
        return forecast
    R.sample(model, [0, 1], steps=STEPS, cfg=3.0, seed=0,
             transformer_options=RC.OracleRefresh(LAYOUT, part, model.patch_size).options())
    assert [s for s, _ in seen] == [i for i in range(STEPS) if not LAYOUT.is_full(i)]
    assert all(m is not None and m.shape == (4, 16 * 16) and (m > 0).all() for _, m in seen)
    assert not torch.equal(seen[0][1], seen[-1][1])  # refreshed at the full steps between


def test_low_frequencies_keep_a_smooth_correction_and_drop_a_checkerboard():
    forecast = torch.zeros(1, 64, 2)
    smooth = torch.ones(1, 64, 2)
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0).reshape(1, 64, 1).expand(1, 64, 2)
    part = RC.low_frequencies(2)
    assert torch.allclose(part(forecast, smooth, (8, 8), 0, None), smooth)
    assert part(forecast, checker, (8, 8), 0, None).abs().max() < 1e-6


def test_refresh_ceiling_refuses_bad_arguments_in_one_line(capsys):
    for argv, words in ((["--layout", "1,3"], "--layout"), (["--layout", "40,3"], "--layout"),
                        (["--model", "1px"], "unknown 1px")):
        with pytest.raises(SystemExit):
            RC.parse_args(argv)
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err

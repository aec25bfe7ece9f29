"""Core (host-free) tests of kernels/token_ops.py: merge plans, merge/unmerge, window layouts.

Needs only torch, numpy, pytest and hypothesis.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.token_ops import (
    MergePlan,
    bipartite_merge_plan,
    max_merge_ratio,
    plan_from_targets,
    window_layout,
    window_merge_plan,
)

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PLANNERS = [window_merge_plan, bipartite_merge_plan]


# ---- helpers -------------------------------------------------------------------------------

def _n(grid) -> int:
    return int(np.prod(grid))


def check_plan(plan: MergePlan, n: int):
    """Structural invariants every MergePlan must satisfy."""
    b, m = plan.rep.shape
    assert plan.assign.shape == (b, n)
    assert plan.sizes.shape == (b, m)
    assert plan.n_in == n and plan.n_out == m
    assert plan.assign.dtype == torch.long and plan.rep.dtype == torch.long
    assert plan.sizes.dtype == torch.float32
    assert int(plan.assign.min()) >= 0 and int(plan.assign.max()) < m
    assert int(plan.rep.min()) >= 0 and int(plan.rep.max()) < n
    for row in range(b):
        counts = torch.bincount(plan.assign[row], minlength=m).float()
        assert torch.equal(counts, plan.sizes[row]), "sizes must count the tokens of each slot"
        assert float(plan.sizes[row].sum()) == n, "sizes must sum to N"
        assert bool((plan.sizes[row] >= 1).all()), "no empty slot"
        # the representative is a member of its own slot, slots keep raster order
        assert torch.equal(plan.assign[row, plan.rep[row]], torch.arange(m))
        assert bool((plan.rep[row, 1:] > plan.rep[row, :-1]).all())


def groups(plan: MergePlan, row: int) -> list[list[int]]:
    a = plan.assign[row].tolist()
    out = [[] for _ in range(plan.n_out)]
    for tok, slot in enumerate(a):
        out[slot].append(tok)
    return out


def naive_merge(plan: MergePlan, x: torch.Tensor) -> torch.Tensor:
    """Reference: float64 mean of every group, one Python loop per slot."""
    b, _, c = x.shape
    out = torch.zeros(b, plan.n_out, c, dtype=torch.float64)
    for row in range(b):
        for slot, members in enumerate(groups(plan, row)):
            out[row, slot] = x[row, members].double().mean(0)
    return out


def dyadic(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Values k/8 with |k| <= 64: exact in fp16/bf16/fp32, and sums of a few copies are exact too."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-64, 65, shape, generator=g).float() / 8).to(dtype)


def random_plan(kind: str, b: int, grid, window, num_remove: int, seed: int, c: int = 8):
    x = torch.randn(b, _n(grid), c, generator=torch.Generator().manual_seed(seed))
    f = window_merge_plan if kind == "window" else bipartite_merge_plan
    return f(x, grid, window, num_remove, seed=seed), x


def expected_window_out(n, n_win, k, num_remove):
    n_sel = min(num_remove // (k - 1), n_win)
    return n - n_sel * (k - 1)


def expected_bipartite_out(n, n_win, num_remove):
    return n - min(num_remove, n - n_win)


# grid + window strategies: 2-D grids with 2x2 / 3x3 / 2x3 windows, and 3-D (T, H, W) with (1, 2, 2).
window_2d = st.sampled_from([(2, 2), (3, 3), (2, 3)])


@st.composite
def grid_and_window(draw, allow_3d=True):
    if allow_3d and draw(st.booleans()):
        window = (1, 2, 2)
        grid = (draw(st.integers(1, 3)), draw(st.integers(2, 7)), draw(st.integers(2, 7)))
    else:
        window = draw(window_2d)
        grid = (draw(st.integers(window[0], 9)), draw(st.integers(window[1], 9)))
    return grid, window


# ---- window_layout -------------------------------------------------------------------------

@SETTINGS
@given(gw=grid_and_window())
def test_window_layout_partitions_grid_into_whole_windows_and_border(gw):
    grid, window = gw
    idx, border = window_layout(grid, window, torch.device("cpu"))
    k = _n(window)
    counts = [g // w for g, w in zip(grid, window)]
    assert idx.shape == (_n(counts), k)
    # windows + border is a permutation of all tokens
    allt = torch.cat([idx.reshape(-1), border]).sort().values
    assert torch.equal(allt, torch.arange(_n(grid)))
    coords = np.stack(np.unravel_index(idx.numpy(), grid), -1)  # (n_win, K, ndim)
    offsets = np.array(list(itertools.product(*[range(w) for w in window])))  # raster order in window
    for win in coords:
        origin = win[0]
        assert all(o % w == 0 for o, w in zip(origin, window)), "windows are aligned to the window size"
        assert np.array_equal(win - origin, offsets), "members are the window's cells in raster order"
    # border = exactly the tokens past the last whole window on some axis
    bcoords = np.stack(np.unravel_index(border.numpy(), grid), -1) if len(border) else np.zeros((0, len(grid)))
    for cc in bcoords:
        assert any(c >= n * w for c, n, w in zip(cc, counts, window))
    n_border_expected = _n(grid) - _n(counts) * k
    assert len(border) == n_border_expected


def test_window_layout_odd_grid_7x9():
    idx, border = window_layout((7, 9), (2, 2), torch.device("cpu"))
    assert idx.shape == (3 * 4, 4)
    assert len(border) == 63 - 48
    # last row (h=6) and last column (w=8) are the border
    expected = sorted({6 * 9 + w for w in range(9)} | {h * 9 + 8 for h in range(7)})
    assert border.tolist() == expected
    assert idx[0].tolist() == [0, 1, 9, 10]
    assert idx[1].tolist() == [2, 3, 11, 12]


def test_window_layout_rejects_mismatched_axes():
    with pytest.raises(ValueError, match="same number of axes"):
        window_layout((4, 4), (1, 2, 2), torch.device("cpu"))


def test_max_merge_ratio():
    assert max_merge_ratio((2, 2)) == pytest.approx(0.75)
    assert max_merge_ratio((3, 3)) == pytest.approx(8 / 9)
    assert max_merge_ratio((1, 2, 2)) == pytest.approx(0.75)


# ---- plan_from_targets ---------------------------------------------------------------------

@st.composite
def valid_targets(draw):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 40))
    m = draw(st.integers(1, n))
    rows = []
    for _ in range(b):
        perm = draw(st.permutations(list(range(n))))
        starters = sorted(perm[:m])
        target = list(range(n))
        for t in range(n):
            if t not in starters:
                target[t] = starters[draw(st.integers(0, m - 1))]
        rows.append(target)
    return torch.tensor(rows, dtype=torch.long), m


@SETTINGS
@given(tm=valid_targets())
def test_plan_from_targets_consistent(tm):
    target, m = tm
    b, n = target.shape
    plan = plan_from_targets(target, m)
    check_plan(plan, n)
    for row in range(b):
        # every token's slot is represented by the token it targets
        assert torch.equal(plan.rep[row][plan.assign[row]], target[row])
        starters = (target[row] == torch.arange(n)).nonzero().reshape(-1)
        assert torch.equal(plan.rep[row], starters), "slots keep the raster order of their starters"


def test_plan_from_targets_identity_is_size_one_everywhere():
    target = torch.arange(10).expand(2, 10).clone()
    plan = plan_from_targets(target, 10)
    assert torch.equal(plan.assign, target)
    assert torch.equal(plan.rep, target)
    assert torch.equal(plan.sizes, torch.ones(2, 10))
    x = torch.randn(2, 10, 3)
    assert torch.equal(plan.merge(x), x)
    assert torch.equal(plan.unmerge(x), x)


# ---- plan counts and structure -------------------------------------------------------------

@SETTINGS
@given(gw=grid_and_window(), b=st.integers(1, 3), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_window_plan_counts_and_groups(gw, b, frac, seed):
    grid, window = gw
    n = _n(grid)
    idx, border = window_layout(grid, window, torch.device("cpu"))
    n_win, k = idx.shape
    num_remove = int(frac * n)
    plan, _ = random_plan("window", b, grid, window, num_remove, seed)
    m = expected_window_out(n, n_win, k, num_remove)
    if m == n:
        assert plan is None, "nothing to remove must give no plan (identity)"
        return
    check_plan(plan, n)
    assert plan.n_out == m
    assert (n - m) % (k - 1) == 0, "window merging removes multiples of K-1"
    windows = {tuple(w) for w in idx.tolist()}
    border_set = set(border.tolist())
    for row in range(b):
        sizes = plan.sizes[row]
        assert set(sizes.unique().tolist()) <= {1.0, float(k)}, "a structure group is a whole window"
        assert int((sizes == k).sum()) == (n - m) // (k - 1)
        for slot, members in enumerate(groups(plan, row)):
            if len(members) > 1:
                assert tuple(members) in windows
                assert plan.rep[row, slot].item() in members
            else:
                assert plan.rep[row, slot].item() == members[0]
        for t in border_set:
            assert sizes[plan.assign[row, t]] == 1, "border tokens never merge in the structure stage"


@SETTINGS
@given(gw=grid_and_window(), b=st.integers(1, 3), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_bipartite_plan_counts_and_destinations(gw, b, frac, seed):
    grid, window = gw
    n = _n(grid)
    idx, border = window_layout(grid, window, torch.device("cpu"))
    n_win, k = idx.shape
    num_remove = int(frac * n)
    plan, _ = random_plan("bipartite", b, grid, window, num_remove, seed)
    m = expected_bipartite_out(n, n_win, num_remove)
    if m == n:
        assert plan is None
        return
    check_plan(plan, n)
    assert plan.n_out == m, "exactly num_remove tokens (capped at the number of sources) are removed"
    win_of = {t: w for w, members in enumerate(idx.tolist()) for t in members}
    border_set = set(border.tolist())
    for row in range(b):
        dests = [plan.rep[row, s].item() for s in range(m) if plan.sizes[row, s] > 1]
        assert not (set(dests) & border_set), "border tokens never become destinations"
        dest_windows = [win_of[d] for d in dests]
        assert len(dest_windows) == len(set(dest_windows)), "at most one destination per window"


def test_odd_grid_7x9_border_never_destination_both_planners():
    grid, window = (7, 9), (2, 2)
    n = 63
    idx, border = window_layout(grid, window, torch.device("cpu"))
    border_set = set(border.tolist())
    x = torch.randn(2, n, 16, generator=torch.Generator().manual_seed(3))
    # bipartite: remove as much as possible: every source (incl. border) merges
    plan = bipartite_merge_plan(x, grid, window, n, seed=1)
    assert plan.n_out == len(idx) == 12
    for row in range(2):
        assert not (set(plan.rep[row].tolist()) & border_set)
        assert float(plan.sizes[row].sum()) == n
    # window: at most all 12 windows, 36 tokens; border tokens stay on their own
    plan = window_merge_plan(x, grid, window, n, seed=1)
    assert plan.n_out == n - 12 * 3
    for row in range(2):
        assert border_set <= set(plan.rep[row].tolist())
        for t in border_set:
            assert plan.sizes[row, plan.assign[row, t]] == 1


@pytest.mark.parametrize("planner", PLANNERS)
def test_zero_remove_gives_none(planner):
    x = torch.randn(2, 64, 8)
    assert planner(x, (8, 8), (2, 2), 0) is None
    assert planner(x, (8, 8), (2, 2), -3) is None


def test_window_plan_below_one_window_gives_none():
    x = torch.randn(1, 64, 8)
    assert window_merge_plan(x, (8, 8), (2, 2), 2) is None  # K-1 = 3 tokens per window
    assert window_merge_plan(x, (8, 8), (2, 2), 3).n_out == 61


@pytest.mark.parametrize("planner", PLANNERS)
def test_grid_smaller_than_window_gives_none(planner):
    x = torch.randn(1, 3, 8)
    assert planner(x, (1, 3), (2, 2), 2) is None


# ---- merge / unmerge ----------------------------------------------------------------------

@SETTINGS
@given(gw=grid_and_window(), b=st.integers(1, 3), frac=st.floats(0.05, 1.0), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["window", "bipartite"]), dtype=st.sampled_from(DTYPES))
def test_unmerge_merge_restores_unmerged_tokens_exactly(gw, b, frac, seed, kind, dtype):
    grid, window = gw
    n = _n(grid)
    plan, _ = random_plan(kind, b, grid, window, int(frac * n), seed)
    if plan is None:
        return
    x = torch.randn(b, n, 6, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    merged = plan.merge(x)
    assert merged.dtype == dtype and merged.shape == (b, plan.n_out, 6)
    back = plan.unmerge(merged)
    assert back.dtype == dtype and back.shape == x.shape
    single = plan.sizes.gather(1, plan.assign) == 1  # (B, N) tokens alone in their slot
    assert torch.equal(back[single], x[single])
    # every token receives its own slot's value
    for row in range(b):
        assert torch.equal(back[row], merged[row, plan.assign[row]])


@SETTINGS
@given(gw=grid_and_window(), b=st.integers(1, 3), frac=st.floats(0.05, 1.0), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["window", "bipartite"]), dtype=st.sampled_from(DTYPES))
def test_constant_groups_merge_losslessly(gw, b, frac, seed, kind, dtype):
    grid, window = gw
    n = _n(grid)
    plan, _ = random_plan(kind, b, grid, window, int(frac * n), seed)
    if plan is None:
        return
    y = dyadic((b, plan.n_out, 5), seed, dtype)
    x = plan.unmerge(y)  # every group is constant
    assert torch.equal(plan.merge(x), y)
    assert torch.equal(plan.unmerge(plan.merge(x)), x)


@SETTINGS
@given(gw=grid_and_window(), b=st.integers(1, 2), frac=st.floats(0.05, 1.0), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["window", "bipartite"]))
def test_merge_is_group_mean_vs_naive_loop(gw, b, frac, seed, kind):
    grid, window = gw
    n = _n(grid)
    plan, _ = random_plan(kind, b, grid, window, int(frac * n), seed)
    if plan is None:
        return
    x = torch.randn(b, n, 4, generator=torch.Generator().manual_seed(seed + 7))
    ref = naive_merge(plan, x)
    torch.testing.assert_close(plan.merge(x).double(), ref, rtol=1e-5, atol=1e-6)
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        xd = x.to(dtype)
        ref_d = naive_merge(plan, xd)
        torch.testing.assert_close(plan.merge(xd).double(), ref_d, rtol=tol, atol=tol)


def test_merge_small_hand_example():
    # tokens 0,1,2 -> slot 0 (rep 0); token 3 alone; tokens 4,5 -> slot 2 (rep 5)
    target = torch.tensor([[0, 0, 0, 3, 5, 5]])
    plan = plan_from_targets(target, 3)
    assert plan.assign.tolist() == [[0, 0, 0, 1, 2, 2]]
    assert plan.rep.tolist() == [[0, 3, 5]]
    assert plan.sizes.tolist() == [[3.0, 1.0, 2.0]]
    x = torch.tensor([[[1.0], [2.0], [6.0], [7.0], [10.0], [20.0]]])
    assert plan.merge(x).reshape(-1).tolist() == [3.0, 7.0, 15.0]
    assert plan.unmerge(plan.merge(x)).reshape(-1).tolist() == [3.0, 3.0, 3.0, 7.0, 15.0, 15.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("planner", PLANNERS)
def test_plans_from_low_precision_metric(planner, dtype):
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    plan = planner(x, (8, 8), (2, 2), 30, seed=4)
    check_plan(plan, 64)
    assert plan.merge(x).dtype == dtype
    assert plan.unmerge(plan.merge(x)).dtype == dtype


# ---- take_rep ------------------------------------------------------------------------------

@SETTINGS
@given(b=st.integers(1, 3), seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["window", "bipartite"]))
def test_take_rep_picks_representatives(b, seed, kind):
    grid, window = (6, 7), (2, 2)
    n = 42
    plan, _ = random_plan(kind, b, grid, window, 20, seed)
    # per-batch tensor, tokens on dim 1
    t = torch.randn(b, n, 3)
    got = plan.take_rep(t, dim=1)
    assert got.shape == (b, plan.n_out, 3)
    for row in range(b):
        assert torch.equal(got[row], t[row, plan.rep[row]])
    # Flux-style rotary table shared by the batch: (1, 1, N, 2, 2), tokens on dim 2
    pe = torch.randn(1, 1, n, 2, 2)
    got = plan.take_rep(pe, dim=2)
    assert got.shape == (b, 1, plan.n_out, 2, 2)
    for row in range(b):
        assert torch.equal(got[row, 0], pe[0, 0, plan.rep[row]])


# ---- similarity: the most redundant tokens merge -----------------------------------------

def _constant_window_metric(grid, window, const_windows, seed, c=16):
    g = torch.Generator().manual_seed(seed)
    idx, _ = window_layout(grid, window, torch.device("cpu"))
    x = torch.randn(1, _n(grid), c, generator=g)
    for w in const_windows:
        x[0, idx[w]] = torch.randn(c, generator=g)
    return x, idx


@pytest.mark.parametrize("planner", PLANNERS)
def test_identical_windows_are_the_ones_merged(planner):
    grid, window = (8, 10), (2, 2)
    const = [0, 7, 13, 19]
    x, idx = _constant_window_metric(grid, window, const, seed=11)
    plan = planner(x, grid, window, 3 * len(const), seed=5)
    merged = sorted(sorted(m) for m in groups(plan, 0) if len(m) > 1)
    assert merged == sorted(sorted(idx[w].tolist()) for w in const)
    # and because those groups are constant, merging them loses nothing
    torch.testing.assert_close(plan.unmerge(plan.merge(x)), x, rtol=0, atol=1e-6)


# ---- batch independence and determinism ----------------------------------------------------

@pytest.mark.parametrize("planner", PLANNERS)
def test_plan_row_depends_only_on_its_own_tokens(planner):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 80, 8, generator=g)
    y = x.clone()
    y[0] = torch.randn(80, 8, generator=g)
    y[2] = torch.randn(80, 8, generator=g)
    p, q = planner(x, (8, 10), (2, 2), 30, seed=9), planner(y, (8, 10), (2, 2), 30, seed=9)
    assert torch.equal(p.assign[1], q.assign[1]) and torch.equal(p.rep[1], q.rep[1])
    assert torch.equal(p.merge(x)[1], q.merge(y)[1])
    assert not torch.equal(p.assign[0], q.assign[0])  # the changed rows did change


@pytest.mark.parametrize("planner", PLANNERS)
def test_first_row_of_batched_plan_equals_plan_of_that_row_alone(planner):
    x = torch.randn(3, 80, 8, generator=torch.Generator().manual_seed(1))
    p = planner(x, (8, 10), (2, 2), 30, seed=9)
    q = planner(x[:1], (8, 10), (2, 2), 30, seed=9)
    assert torch.equal(p.assign[0], q.assign[0]) and torch.equal(p.rep[0], q.rep[0])


@pytest.mark.parametrize("planner", PLANNERS)
def test_every_row_of_batched_plan_equals_plan_of_that_row_alone(planner):
    x = torch.randn(3, 80, 8, generator=torch.Generator().manual_seed(1))
    p = planner(x, (8, 10), (2, 2), 30, seed=9)
    for row in range(3):
        q = planner(x[row:row + 1], (8, 10), (2, 2), 30, seed=9)
        assert torch.equal(p.assign[row], q.assign[0]) and torch.equal(p.rep[row], q.rep[0])


@pytest.mark.parametrize("planner", PLANNERS)
def test_plans_are_deterministic_for_a_seed(planner):
    x = torch.randn(2, 80, 8, generator=torch.Generator().manual_seed(2))
    p1 = planner(x, (8, 10), (2, 2), 30, seed=123)
    p2 = planner(x.clone(), (8, 10), (2, 2), 30, seed=123)
    for a, b in ((p1.assign, p2.assign), (p1.rep, p2.rep), (p1.sizes, p2.sizes)):
        assert torch.equal(a, b)
    # the seed moves the destinations
    reps = {tuple(planner(x, (8, 10), (2, 2), 30, seed=s).rep[0].tolist()) for s in range(6)}
    assert len(reps) > 1


# ---- 3-D grids ----------------------------------------------------------------------------

@pytest.mark.parametrize("planner", PLANNERS)
def test_3d_grid_groups_stay_within_a_frame(planner):
    grid, window = (3, 5, 6), (1, 2, 2)
    n = 90
    idx, border = window_layout(grid, window, torch.device("cpu"))
    assert idx.shape == (3 * 2 * 3, 4) and len(border) == 90 - 72
    x = torch.randn(2, n, 8, generator=torch.Generator().manual_seed(4))
    plan = planner(x, grid, window, 30, seed=2)
    check_plan(plan, n)
    if planner is window_merge_plan:
        assert plan.n_out == n - 10 * 3
        for row in range(2):
            for members in groups(plan, row):
                frames = {m // 30 for m in members}
                assert len(frames) == 1, "a (1,2,2) window never spans frames"
    else:
        assert plan.n_out == n - 30
    y = dyadic((2, plan.n_out, 4), 0)
    assert torch.equal(plan.merge(plan.unmerge(y)), y)

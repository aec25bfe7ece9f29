"""Core tests of kernels/density.py: pooling plans, windows per block and step, exact restore."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.runtime import RUNS_KEY
from kernels.density import (FLEXDIT_LAYOUT, DensityConfig, DensitySchedule, parse_stage_windows, pool_plan, window_for_ratio,
                             window_ratio)
from kernels.families import flux_family, image_span
from kernels.block_runners import run_block_merged
from kernels.schedule import TokenRatioSchedule
from tools import reference_dit as R

SETTINGS = settings(max_examples=30, deadline=None)
CPU = torch.device("cpu")


def flexdit(**kw) -> DensityConfig:
    """FlexDiT's layout (pooling from the first step, dense bottom/top blocks, spans), with overrides:
    the layout logic these tests check, independent of the node's measured defaults."""
    return DensityConfig(**{**FLEXDIT_LAYOUT, **kw})


# ---- the pooling plan -------------------------------------------------------------------------

@SETTINGS
@given(h=st.integers(1, 13), w=st.integers(1, 13), k=st.integers(2, 4))
def test_pool_plan_is_avg_pool_with_partial_edge_windows(h, w, k):
    plan = pool_plan((h, w), k, CPU)
    assert plan.n_in == h * w
    assert plan.n_out == math.ceil(h / k) * math.ceil(w / k)
    assert float(plan.sizes.sum()) == h * w
    x = torch.randn(2, h * w, 5)
    b = 2
    from kernels.token_ops import MergePlan
    plan_b = MergePlan(plan.assign.expand(b, -1), plan.rep.expand(b, -1), plan.sizes.expand(b, -1))
    pooled = plan_b.merge(x)
    # torch's own average pooling over the same windows (partial windows averaged over their members)
    img = x.transpose(1, 2).reshape(b, 5, h, w)
    ref = F.avg_pool2d(img, k, stride=k, ceil_mode=True, count_include_pad=False)
    assert torch.allclose(pooled, ref.reshape(b, 5, -1).transpose(1, 2), atol=1e-6)
    # Pool(Up(D)) = D: what makes a chain of pooled blocks FlexDiT's sparse span (dyadic values:
    # the float32 sums are exact, so equality is exact)
    d = torch.randint(-16, 16, (b, plan.n_out, 5)).float() / 4
    assert torch.equal(plan_b.merge(plan_b.unmerge(d)), d)


def test_pool_plan_representatives_are_window_centres():
    plan = pool_plan((6, 7), 3, CPU)
    rows, cols = plan.rep[0] // 7, plan.rep[0] % 7
    assert rows.tolist() == [1, 1, 1, 4, 4, 4]
    assert cols.tolist() == [1, 4, 6, 1, 4, 6]  # last column window has one column (6)
    even = pool_plan((4, 4), 2, CPU)
    assert even.rep[0].tolist() == [0, 2, 8, 10]  # top-left of the centre for even windows


def test_pool_plan_video_grid_pools_each_frame():
    plan = pool_plan((3, 4, 4), 2, CPU)
    assert plan.n_out == 3 * 4
    frames_of_slot = plan.rep[0] // 16
    assert frames_of_slot.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # every token's slot lies in its own frame
    slot_frame = frames_of_slot[plan.assign[0]]
    assert torch.equal(slot_frame, torch.arange(48) // 16)


# ---- ratio <-> window ------------------------------------------------------------------------

def test_window_ratio_and_nearest_window():
    assert [window_ratio(k) for k in (1, 2, 3, 4)] == pytest.approx([0.0, 0.75, 8 / 9, 15 / 16])
    assert window_for_ratio(0.0) == 1
    assert window_for_ratio(0.37) == 1 and window_for_ratio(0.38) == 2
    assert window_for_ratio(0.5) == 2 and window_for_ratio(0.75) == 2
    assert window_for_ratio(0.81) == 2 and window_for_ratio(0.83) == 3
    assert window_for_ratio(0.9) == 3 and window_for_ratio(0.92) == 4
    assert window_for_ratio(0.95, max_window=3) == 3


@SETTINGS
@given(r=st.floats(0, 0.99))
def test_window_for_ratio_is_nearest(r):
    k = window_for_ratio(r)
    assert all(abs(window_ratio(k) - r) <= abs(window_ratio(j) - r) + 1e-12 for j in (1, 2, 3, 4))


def test_parse_stage_windows():
    assert parse_stage_windows("2, 2, 2, 1") == (2, 2, 2, 1)
    assert parse_stage_windows("3;2;2;1") == (3, 2, 2, 1)
    with pytest.raises(ValueError, match="needs 4 comma-separated windows"):
        parse_stage_windows("2, 2")
    with pytest.raises(ValueError, match="'x' is not a whole number"):
        parse_stage_windows("2, x, 2, 1")
    with pytest.raises(ValueError, match=r"must lie in 1\.\.4"):
        parse_stage_windows("5, 2, 2, 1")


# ---- schedules ------------------------------------------------------------------------------

def test_temporal_stages_raise_density():
    m = DensitySchedule(flexdit(stage_windows=(3, 2, 2, 1), span_pattern=False))
    ks = [m.window(5, 12, p) for p in (0.0, 0.14, 0.15, 0.46, 0.47, 0.75, 0.76, 0.99)]
    assert ks == [3, 3, 2, 2, 2, 2, 1, 1]


def test_spatial_schedule_bottom_top_and_spans():
    m = DensitySchedule(flexdit(bottom_dense=0.07, top_dense=0.07))
    # 57 blocks (Flux): bottom ceil(3.99) = 4, top 4 dense; middle spans [P P P P D D]
    ks = [m.window(b, 57, 0.0) for b in range(57)]
    assert ks[:4] == [1] * 4 and ks[-4:] == [1] * 4
    assert ks[4:16] == [2, 2, 2, 2, 1, 1] * 2
    no_span = DensitySchedule(flexdit(span_pattern=False))
    assert [no_span.window(b, 57, 0.0) for b in range(4, 53)] == [2] * 49
    tiny = [no_span.window(b, 4, 0.0) for b in range(4)]
    assert tiny == [1, 2, 2, 1], "any fraction above 0 keeps at least one block dense"


def test_connected_schedule_decides_every_block_and_step():
    s = TokenRatioSchedule(depth=[0.0, 1.0], progress=[0.0, 1.0], ratios=[[0.9, 0.0], [0.5, 0.2]])
    m = DensitySchedule(flexdit(), schedule=s)
    for b in range(6):
        for p in (0.0, 0.3, 0.6, 0.95):
            assert m.window(b, 6, p) == window_for_ratio(s.ratio(b / 5, p))
    assert m.window(0, 6, 0.0) == 3 and m.window(5, 6, 0.0) == 2 and m.window(0, 6, 1.0) == 1


def test_start_end_percent_window():
    m = DensitySchedule(flexdit(span_pattern=False, start_percent=0.2, end_percent=0.5,
                                      stage_windows=(2, 2, 2, 2)))
    assert [m.window(2, 6, p) for p in (0.1, 0.2, 0.49, 0.5)] == [1, 2, 2, 1]


def test_plan_and_bias():
    m = DensitySchedule(flexdit(span_pattern=False))
    x = torch.randn(2, 35, 8)
    plan = m.plan(x, (5, 7), 2, 6, 0.0)
    assert plan.assign.shape == (2, 35) and plan.n_out == 12
    assert m.weighted_attention() and torch.equal(plan.log_sizes(), plan.sizes.log())
    assert m.plan(x, (5, 7), 0, 6, 0.0) is None  # bottom block is dense
    assert m.plan(x, (5, 7), 2, 6, 0.9) is None  # last stage is dense
    off = DensitySchedule(flexdit(span_pattern=False, proportional_attention=False))
    assert not off.weighted_attention()
    with pytest.raises(ValueError, match="bottom_dense must lie"):
        DensitySchedule(flexdit(bottom_dense=1.5))


# ---- running a block pooled ------------------------------------------------------------------

def _args(b=2, n_txt=3, grid=(5, 7), c=8, single=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    img = torch.randn(b, n, c, generator=g)
    txt = torch.randn(b, n_txt, c, generator=g)
    pe = torch.randn(1, 1, n_txt + n, 4, 2, 2, generator=g)
    if single:
        return {"img": torch.cat([txt, img], 1), "vec": None, "pe": pe, "transformer_options": {}}, n, n_txt
    return {"img": img, "txt": txt, "vec": None, "pe": pe, "transformer_options": {}}, n, n_txt


@pytest.mark.parametrize("single", [False, True], ids=["double", "single"])
def test_identity_block_restores_the_exact_input(single):
    fam = flux_family("flux", 1, 1)
    spec = fam.blocks[1] if single else fam.blocks[0]
    args, n, n_txt = _args(single=single)
    span = image_span(spec, args, n, n_txt, fam)
    plan = DensitySchedule(flexdit(span_pattern=False, bottom_dense=0, top_dense=0)).plan(
        args["img"][:, span.img_start:span.img_start + n], (5, 7), 0, 2, 0.0)
    seen = {}

    def identity(a):
        seen["n"] = a["img"].shape[1]
        seen["pe"] = a["pe"].shape
        return {k: a[k] for k in ("img", "txt") if k in a}

    out = run_block_merged(args, identity, plan, span, fam, plan.sizes.log())
    assert seen["n"] == (n_txt if single else 0) + 12
    assert seen["pe"][2] == n_txt + 12
    assert torch.equal(out["img"], args["img"])


def test_block_update_is_upsampled_onto_every_token():
    """X + Up(F(Pool X) - Pool X), checked against a direct computation with a per-token block."""
    fam = flux_family("flux", 1, 0)
    args, n, n_txt = _args()
    lin = torch.nn.Linear(8, 8)
    span = image_span(fam.blocks[0], args, n, n_txt, fam)
    plan = DensitySchedule(flexdit(span_pattern=False, bottom_dense=0, top_dense=0)).plan(
        args["img"], (5, 7), 0, 1, 0.0)

    def block(a):
        return {"img": a["img"] + torch.tanh(lin(a["img"])), "txt": a["txt"]}

    with torch.no_grad():
        out = run_block_merged(args, block, plan, span, fam)["img"]
        x = args["img"]
        img = x.transpose(1, 2).reshape(2, 8, 5, 7)
        pooled = F.avg_pool2d(img, 2, stride=2, ceil_mode=True, count_include_pad=False)
        delta = torch.tanh(lin(pooled.flatten(2).transpose(1, 2)))  # (2, 12, 8)
        up = delta.transpose(1, 2).reshape(2, 8, 3, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :5, :7]
        expected = x + up.flatten(2).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-6)


# ---- end to end on the embedded reference model ----------------------------------------------

CFG = R.DiTConfig(image_size=32, hidden=64, heads=2, axes_dim=(8, 12, 12), depth_double=2, depth_single=4)


@pytest.fixture(scope="module")
def ref(one_torch_thread):
    model, _ = R.build_model(CFG, seed=0, weights=None)
    return model


def test_reference_model_identity_window_and_token_savings(ref):
    base = R.sample(ref, [0, 1], steps=4, seed=0)
    off = DensitySchedule(flexdit(start_percent=1.0))
    assert torch.equal(R.sample(ref, [0, 1], steps=4, seed=0, transformer_options=R.method_options(off, ref, "density")),
                       base)
    on = DensitySchedule(flexdit(span_pattern=False))
    to = R.method_options(on, ref, "density")
    out = R.sample(ref, [0, 1], steps=4, seed=0, transformer_options=to)
    stats = to[RUNS_KEY]["density"].stats
    # 6 blocks: first and last dense; 4 steps at progress 0, .25, .5, .75: stages 0, 1, 2, 2 -> pooled in all 4
    assert stats.block_calls == 4 * 6 and stats.merged_calls == 4 * 4
    assert stats.tokens_computed == 4 * (2 * 256 + 4 * 64)
    other_seed = R.sample(ref, [0, 1], steps=4, seed=1)
    err = float((out - base).norm() / base.norm())
    assert 1e-3 < err < 0.5 * float((other_seed - base).norm() / base.norm()), err

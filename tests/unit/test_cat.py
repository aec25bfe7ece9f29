"""Core tests of CAT Pruning (kernels/cat.py): selection, clustering, balance, schedule, reference model."""
from __future__ import annotations

import pytest
import torch

from kernels.cat import CATConfig, CATPruning
from conftest import kmeans_labels, select_tokens, staleness_bound, step_plan
from kernels.cat_select import cluster_counts, cluster_scores, select_tokens_batched
from kernels.runtime import CallInfo
from kernels.schedule import TokenRatioSchedule
from kernels.token_ops import patchify, unpatchify


def _noise(n, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_kmeans_is_deterministic_spatial_and_uses_all_labels():
    grid = (16, 16)
    noise = _noise(256, 64)
    a = kmeans_labels(noise, grid, 20, seed=3)
    b = kmeans_labels(noise, grid, 20, seed=3)
    assert torch.equal(a, b)
    assert a.shape == (256,) and int(a.min()) >= 0 and int(a.max()) < 20
    assert len(torch.unique(a)) >= 15  # k-means keeps (almost) every cluster filled
    # Position dominates the feature (0.05 x noise): a cluster's tokens sit close together on the grid.
    ys, xs = torch.div(torch.arange(256), 16, rounding_mode="floor").float(), (torch.arange(256) % 16).float()
    spreads = [float(ys[a == c].std() + xs[a == c].std()) for c in torch.unique(a) if (a == c).sum() > 2]
    assert sum(spreads) / len(spreads) < 4.0, spreads  # a random labelling spreads ~9.2


def test_cluster_scores_rank_the_cluster_with_the_largest_change_first():
    labels = torch.arange(64) // 16  # 4 clusters of 16
    delta = torch.zeros(64, 8)
    delta[40, 3] = 5.0  # one token of cluster 2 changes a lot
    delta[5, :] = 0.5   # cluster 0 changes a little everywhere in one token
    scores = cluster_scores(delta, labels, 5)
    assert int(scores.argmax()) == 2
    assert float(scores[4]) == -1.0  # an empty cluster ranks last


@pytest.mark.parametrize("n_keep", [1, 7, 19, 77, 128, 255])
@pytest.mark.parametrize("first", [True, False])
def test_selection_has_the_requested_count_distinct_and_deterministic(n_keep, first):
    n = 256
    delta = _noise(n, seed=1)
    labels = kmeans_labels(_noise(n, seed=2), (16, 16), 20)
    age = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(4))
    a = select_tokens(delta, labels, age, n_keep, 0.75, first)
    b = select_tokens(delta, labels, age, n_keep, 0.75, first)
    assert torch.equal(a, b)
    assert a.numel() == n_keep == len(torch.unique(a))
    assert int(a.min()) >= 0 and int(a.max()) < n


def test_selection_follows_noise_change_and_staleness():
    n, n_keep = 256, 64
    labels = kmeans_labels(_noise(n, seed=2), (16, 16), 20)
    delta = torch.zeros(n, 16)
    hot = torch.tensor([3, 50, 100, 200])
    delta[hot] = 10.0
    age = torch.zeros(n, dtype=torch.long)
    old = torch.arange(160, 208)  # 48 tokens not computed for 5 steps
    age[old] = 5
    sel = set(select_tokens(delta, labels, age, n_keep, 0.75, first=False).tolist())
    assert set(hot.tolist()) <= sel, "tokens whose noise changed most are computed"
    assert set(old.tolist()) <= sel, "with balance 0.75 the 48 stalest tokens are computed"
    # balance 0: the staleness share shrinks to the one guaranteed token
    sel0 = set(select_tokens(delta, labels, age, n_keep, 0.0, first=False).tolist())
    assert set(hot.tolist()) <= sel0 and len(set(old.tolist()) & sel0) < len(old)


@pytest.mark.parametrize("n_keep,balance", [(77, 0.75), (26, 0.75), (64, 0.1), (40, 0.0)])
def test_every_token_is_recomputed_within_the_bound(n_keep, balance):
    """Simulate the pruned phase with adversarial deltas (always the same hot tokens): no starvation."""
    n = 256
    labels = kmeans_labels(_noise(n, seed=5), (16, 16), 20)
    delta = torch.zeros(n, 8)
    delta[:32] = torch.arange(32, 0, -1.0)[:, None]
    age = torch.zeros(n, dtype=torch.long)
    bound = staleness_bound(n, n_keep, balance)
    worst = 0
    for step in range(3 * bound + 5):
        sel = select_tokens(delta, labels, age, n_keep, balance, first=step == 0)
        age += 1
        age[sel] = 0
        worst = max(worst, int(age.max()))
    assert worst < bound, (worst, bound)  # age counts the steps a token sat out, so < bound


def test_patchify_roundtrip_with_odd_sizes():
    x = torch.randn(2, 3, 9, 11)
    grid = (5, 6)
    t = patchify(x, grid, 2)
    assert t.shape == (2, 30, 12)
    assert torch.equal(unpatchify(t, x.shape, 2), x)


def _call(progress, sigma, grid=(8, 8), rows=()):
    return CallInfo(grid, grid[0] * grid[1], 4, progress, sigma, rows, num_blocks=4, patch=2)


def test_schedule_full_then_pruned_with_refresh_and_reset():
    method = CATPruning(CATConfig(ratio=0.75, full_percent=0.25, refresh_every=2))
    state = method.new_run_state()
    x = torch.zeros(1, 4, 16, 16)
    modes = []
    for i in range(10):
        p = i / 10
        call = _call(p, 1 - p)
        plan = method.begin_call(state, call, x)
        state.kv.setdefault(plan.signature, {0: {}})  # the block runner would fill this
        modes.append("full" if plan.selection is None else plan.selection.shape[1])
        method.end_call(state, call, plan, torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(i)))
    # full below 0.25 (3 steps), then 2 pruned steps, 1 refresh, ... ; 16 of 64 tokens kept
    assert modes == ["full"] * 3 + [16, 16, "full", 16, 16, "full", 16]
    # the schedule read off the config decides the same
    assert step_plan(method, [i / 10 for i in range(10)], 64, 4) == [64 if m == "full" else m for m in modes]
    # sigma going up marks a new run: everything is reset
    plan = method.begin_call(state, _call(0.0, 1.0), x)
    assert plan.selection is None and not state.rows


def _run_linear_noise(forecast: float, first_off_trend: bool = True, turn_at: int | None = None):
    """A 10-step run whose predicted noise is exactly A + B * sigma (the first step off that line when
    `first_off_trend`; from step `turn_at` on, A' - B * sigma: the trend turns back); returns per step
    (output noise or None for a full call, the exact noise)."""
    method = CATPruning(CATConfig(ratio=0.75, full_percent=0.15, refresh_every=2, forecast=forecast))
    state = method.new_run_state()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 4, 16, 16, generator=gen)
    x = torch.zeros(1, 4, 16, 16)
    out = []
    for i in range(10):
        p = i / 10
        call = _call(p, 1 - p)
        plan = method.begin_call(state, call, x)
        state.kv.setdefault(plan.signature, {0: {}})
        plan.pruned = plan.selection is not None  # the block runner prunes the blocks of a pruned call
        exact = a + b * (1 - p)
        if turn_at is not None and i >= turn_at:
            exact = a + b * (2 * (1 - turn_at / 10) - (1 - p))
        fed = torch.randn(1, 4, 16, 16, generator=gen) if (i == 0 and first_off_trend) else exact
        res = method.end_call(state, call, plan, fed)
        out.append((res, exact))
    return out


def test_a_pruned_call_whose_blocks_all_ran_unreduced_keeps_what_they_computed():
    """A call CAT planned to prune but whose blocks ran on every token (a layout the adapter could not
    verify): nothing is replaced by the cache, and the call is recorded as a full one."""
    method = CATPruning(CATConfig(ratio=0.75, full_percent=0.15, refresh_every=0))
    state = method.new_run_state()
    x = torch.zeros(1, 4, 16, 16)
    for i in range(3):
        call = _call(i / 10, 1 - i / 10)
        plan = method.begin_call(state, call, x)
        state.kv.setdefault(plan.signature, {0: {}})
        noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(i))
        assert method.end_call(state, call, plan, noise) is None, "plan.pruned stays False: no block pruned"
    assert plan.selection is not None, "the last call was planned as pruned"
    assert torch.equal(unpatchify(state.rows[plan.rows[0]].prev[None], x.shape, 2)[0], noise[0])


def _served(steps, i):
    """The noise step i of a _run_linear_noise run served: the fed noise of a full step, else the output."""
    return steps[i][1] if steps[i][0] is None else steps[i][0][0]


def test_forecast_follows_the_trend_of_the_last_two_full_steps():
    """Full steps 0, 1, 4, 7. Step 0 (pure noise, off the line) never starts a slope, so steps 2-3
    hold step 1's noise; from step 5 on, forecast 1 continues the linear trend exactly for the tokens
    not computed (steps 5-6 from steps 1 and 4, 8-9 from 4 and 7)."""
    steps = _run_linear_noise(1.0)
    pruned = [(i, r, e) for i, (r, e) in enumerate(steps) if r is not None]
    assert [i for i, _, _ in pruned] == [2, 3, 5, 6, 8, 9]
    for i, (noise, computed), exact in pruned:
        idle = ~computed
        assert idle.any() and torch.equal(noise[computed], exact[computed]), i
        if i < 4:  # no slope yet: the noise of the previous step, held
            held = _served(steps, i - 1)
            assert torch.equal(noise[idle], held[idle]), i
        else:
            assert torch.allclose(noise, exact, atol=1e-5), i


def test_forecast_is_damped_and_zero_is_plain_reuse():
    damped, plain = _run_linear_noise(0.5), _run_linear_noise(0.0)
    for i in (5, 6, 8, 9):
        for run, check in ((plain, "hold"), (damped, "half")):
            (noise, computed), exact = run[i]
            held = _served(run, i - 1)
            idle = ~computed
            if check == "hold":  # plain reuse: a token not computed keeps the noise it had at the previous step
                assert torch.equal(noise[idle], held[idle]), i
            elif run[i - 1][0] is None:  # right after a full step: halfway between holding and the trend
                assert torch.allclose(noise[idle], 0.5 * (held[idle] + exact[idle]), atol=1e-5), i
        err = [(run[i][0][0] - run[i][1]).abs().max() for run in (damped, plain)]
        assert err[0] < err[1], (i, err)


def test_forecast_stops_when_the_trend_fails_a_full_step():
    """Full steps 0, 1, 4, 7; the noise turns back along its line at step 3 (as when a sampler adds
    fresh noise). Steps 5-6 follow the slope of steps 1 and 4 (nothing has checked it yet); at step 7
    that slope predicts worse than holding step 4's noise, so steps 8-9 hold their noise. Without the
    turn, steps 8-9 follow the trend."""
    turned, straight = _run_linear_noise(1.0, turn_at=3), _run_linear_noise(1.0)
    for i in (8, 9):
        (noise, computed), exact = turned[i]
        held = _served(turned, i - 1)
        idle = ~computed
        assert torch.equal(noise[idle], held[idle]), i
        assert not torch.allclose(noise, exact, atol=1e-3), i
        (noise, computed), exact = straight[i]
        assert torch.allclose(noise, exact, atol=1e-5), i


def test_forecast_out_of_range_is_refused():
    with pytest.raises(ValueError, match="forecast"):
        CATPruning(CATConfig(forecast=1.5))


def test_ratio_from_a_schedule_is_averaged_over_depth():
    sched = TokenRatioSchedule(depth=[0.0, 1.0], progress=[0.0, 1.0], ratios=[[0.2, 0.2], [0.6, 0.6]])
    method = CATPruning(CATConfig(ratio=0.9), schedule=sched)
    assert method.ratio(0.5, num_blocks=3) == pytest.approx(0.4)
    assert method.n_keep(100, 0.5, 3) == 60


def test_invalid_config_raises():
    for ratio in (1.01, -0.1):
        with pytest.raises(ValueError, match="ratio"):
            CATPruning(CATConfig(ratio=ratio))
    with pytest.raises(ValueError, match="full_percent"):
        CATPruning(CATConfig(full_percent=1.5))


# ---- the embedded reference model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref_model(one_torch_thread):
    from tools import reference_dit as R
    model, _ = R.build_model(R.DiTConfig(image_size=32), seed=0, weights=None)
    return model


def test_reference_model_identity_and_determinism(ref_model):
    from tools import reference_dit as R
    base = R.sample(ref_model, [1, 2], steps=8)
    off = R.method_options(CATPruning(CATConfig(start_percent=1.0)), ref_model, "cat")
    assert torch.equal(R.sample(ref_model, [1, 2], steps=8, transformer_options=off), base)
    to = R.method_options(CATPruning(CATConfig(full_percent=0.3)), ref_model, "cat")
    a = R.sample(ref_model, [1, 2], steps=8, transformer_options=to)
    b = R.sample(ref_model, [1, 2], steps=8, transformer_options=to)  # same options: state resets itself
    assert torch.equal(a, b) and not torch.equal(a, base)
    other_seed = float((R.sample(ref_model, [1, 2], steps=8, seed=1) - base).norm())
    assert float((a - base).norm()) < 0.5 * other_seed


def test_reference_model_flops_follow_the_kept_fraction(ref_model):
    from tools import reference_dit as R
    steps, cfg = 8, R.DiTConfig(image_size=32)
    with R.flop_counter() as base_mode:
        R.sample(ref_model, [1], steps=steps)
    method = CATPruning(CATConfig(ratio=0.75, full_percent=0.5, refresh_every=0))
    with R.flop_counter() as cat_mode:
        R.sample(ref_model, [1], steps=steps, transformer_options=R.method_options(method, ref_model, "cat"))
    n_img, n_txt, rows = 256, cfg.txt_len, 2
    keep = n_img - int(0.75 * n_img)
    full_steps = 4  # progress 0, 1/8, 2/8, 3/8 < 0.5
    blocks = [(True, cfg.depth_double), (False, cfg.depth_single)]

    def per_call(n_q):
        total = 0
        for double, count in blocks:
            h, m = cfg.hidden, int(cfg.hidden * cfg.mlp_ratio)
            linear = (3 * h * h + h * h + 2 * h * m) if double else (h * (3 * h + m) + (h + m) * h)
            total += count * (2 * n_q * linear + 4 * n_q * (n_img + n_txt) * h)
        return total
    saved = rows * (steps - full_steps) * (per_call(n_img + n_txt) - per_call(keep + n_txt))
    base_total, cat_total = base_mode.get_total_flops(), cat_mode.get_total_flops()
    # Everything outside the blocks (embedders, final layer, k-means) is unchanged or tiny.
    assert abs((base_total - cat_total) - saved) < 0.01 * base_total, (base_total, cat_total, saved)


# ---- the block runner is exact: pruned tokens see the same keys/values as a full block ----------

def _block_inputs(model, n_side=6, batch=2, seed=0):
    from tools import reference_dit as R
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    n_img = n_side * n_side
    img = torch.randn(batch, n_img, c.hidden, generator=gen)
    txt = torch.randn(batch, c.txt_len, c.hidden, generator=gen)
    vec = torch.randn(batch, c.hidden, generator=gen)
    ids = torch.zeros(batch, c.txt_len + n_img, 3)
    ids[:, c.txt_len:, 1] = (torch.arange(n_img) // n_side).float()
    ids[:, c.txt_len:, 2] = (torch.arange(n_img) % n_side).float()
    pe = model.pe_embedder(ids)
    return img, txt, vec, pe, n_img, R


@pytest.mark.parametrize("kind", ["double", "single"])
def test_pruned_block_matches_the_full_block_on_selected_tokens(ref_model, kind):
    from kernels.block_runners import run_block_pruned
    from kernels.families import image_span
    img, txt, vec, pe, n_img, R = _block_inputs(ref_model)
    family = ref_model.family()
    n_txt = txt.shape[1]
    if kind == "double":
        blk, spec = ref_model.double_blocks[0], family.blocks[0]
        args = {"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": None, "transformer_options": {}}

        def original(a):
            i, t = blk(a["img"], a["txt"], a["vec"], a["pe"], transformer_options=a["transformer_options"])
            return {"img": i, "txt": t}
    else:
        blk, spec = ref_model.single_blocks[0], family.blocks[ref_model.config.depth_double]
        args = {"img": torch.cat([txt, img], 1), "vec": vec, "pe": pe, "attn_mask": None, "transformer_options": {}}

        def original(a):
            return {"img": blk(a["img"], a["vec"], a["pe"], transformer_options=a["transformer_options"])}
    span = image_span(spec, args, n_img, n_txt, family)
    store = {}
    full = run_block_pruned(args, original, span, family, None, store)
    assert torch.equal(full["img"], original(args)["img"]), "capturing keys/values changes nothing"
    assert store and all(e["k"].shape[2] == n_img for e in store.values())
    gen = torch.Generator().manual_seed(1)
    selection = torch.stack([torch.randperm(n_img, generator=gen)[:11].sort().values for _ in range(2)])
    part = run_block_pruned(args, original, span, family, selection, store)
    a = span.img_start
    idx = selection[:, :, None].expand(-1, -1, img.shape[2])
    got = part["img"][:, a:a + n_img].gather(1, idx)
    want = full["img"][:, a:a + n_img].gather(1, idx)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    keep = torch.zeros(2, n_img, dtype=torch.bool).scatter_(1, selection, True)
    assert torch.equal(part["img"][:, a:a + n_img][~keep], args["img"][:, a:a + n_img][~keep])
    if kind == "double":  # text tokens attend to every image token (cached keys/values)
        assert torch.allclose(part["txt"], full["txt"], atol=1e-5)
    else:
        assert torch.allclose(part["img"][:, :a], full["img"][:, :a], atol=1e-5)
    # without the cached keys/values (pruned tokens dropped from attention) the result would differ
    dropped = run_block_pruned(args, original, span, family, selection, {})
    assert not torch.allclose(dropped["img"][:, a:a + n_img].gather(1, idx), want, atol=1e-3)


# ---- the fp8 key/value cache ------------------------------------------------------------------------

def test_fp8_quantisation_error_is_within_half_a_float8_step():
    from kernels.kv_cache import dequantize_fp8, quantize_fp8
    x = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 40)[:, None]
    bits, scale = quantize_fp8(x)
    assert bits.dtype == torch.uint8 and scale.shape == (2, 3, 40, 1)
    back = dequantize_fp8(bits, scale, torch.float32)
    # e4m3: 3 mantissa bits (relative step 2^-3), subnormal step 2^-9 of the scale
    assert bool(((back - x).abs() <= x.abs() * 2 ** -4 + scale * 2 ** -10).all())
    assert (back - x).abs().max() > 0  # it is a lossy format: the bound above is what the test checks


def test_fp8_cache_stores_about_a_quarter_of_float32_and_changes_little(ref_model):
    from tools import reference_dit as R
    base = R.sample(ref_model, [1, 2], steps=8)
    out, kv_bytes = {}, {}
    for dtype in ("model", "fp8"):
        to = R.method_options(CATPruning(CATConfig(full_percent=0.3, cache_dtype=dtype)), ref_model, "cat")
        out[dtype] = R.sample(ref_model, [1, 2], steps=8, transformer_options=to)
        state = to["token_reduction_runs"]["cat"].state
        kv_bytes[dtype] = sum(t.numel() * t.element_size() for per_block in state.kv.values()
                              for per_call in per_block.values() for entry in per_call.values()
                              for t in entry.values() if isinstance(t, torch.Tensor))
        assert state.peak_cache_bytes >= state.cache_bytes() > kv_bytes[dtype]  # noise rows are counted too
    head_dim = ref_model.config.hidden // ref_model.config.heads
    # one byte per element plus a float32 scale per token and head, against four bytes
    assert kv_bytes["fp8"] * 4 == kv_bytes["model"] * (1 + 4 / head_dim)
    assert float((out["fp8"] - out["model"]).norm()) < 0.01 * float((out["model"] - base).norm())


def test_unknown_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="cache_dtype"):
        CATPruning(CATConfig(cache_dtype="int4"))


# ---- the batched selection equals the per-cluster loop ------------------------------------------------

def _loop_select(delta, labels, age, n_keep, balance, first):
    """The selection as a Python loop over clusters: the specification of the order."""
    from kernels.cat_select import BASE_QUOTA, TOP_CLUSTER_QUOTA, _rank
    n = delta.shape[0]
    mag = delta.float().norm(dim=1)
    n_stale = max(1, int(round(balance * n_keep)))
    n_noise = n_keep - n_stale
    chosen = torch.zeros(n, dtype=torch.bool)
    count = 0
    if n_noise > 0:
        k = int(labels.max()) + 1
        order = torch.argsort(cluster_scores(delta, labels, k), descending=True, stable=True)
        quota = max(1, int(BASE_QUOTA * n_keep))
        stale_key = _rank(age, mag)
        for i, c in enumerate(order.tolist()):
            members = (labels == c).nonzero().flatten()
            if members.numel() == 0:
                continue
            q = min(quota * (TOP_CLUSTER_QUOTA[i] if i < len(TOP_CLUSTER_QUOTA) else 1), members.numel())
            take = [members[torch.topk(mag[members], q).indices]]
            if not first and i != 0 and q // 2 > 0:
                take.append(members[torch.topk(stale_key[members], q // 2).indices])
            for t in take:
                t = t[~chosen[t]][: n_noise - count]
                chosen[t] = True
                count += t.numel()
            if count >= n_noise:
                break
        if count < n_noise:
            t = torch.topk(torch.where(chosen, torch.full_like(mag, -1.0), mag), n_noise - count).indices
            chosen[t] = True
            count += t.numel()
    key = _rank(age, mag)
    key[chosen] = -1.0
    chosen[torch.topk(key, n_keep - count).indices] = True
    return chosen.nonzero().flatten()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_keep,balance", [(13, 0.75), (64, 0.75), (64, 0.25), (200, 0.5), (40, 0.0)])
@pytest.mark.parametrize("first", [True, False])
def test_vectorised_selection_matches_the_per_cluster_loop(seed, n_keep, balance, first):
    """Without ties (continuous random changes and ages), the batched sort-based selection picks exactly the
    tokens the loop did. Ties are where they may differ: the loop took whatever topk returned, the batched
    selection takes the lower token index (next test)."""
    n, gen = 256, torch.Generator().manual_seed(seed)
    delta = torch.randn(n, 8, generator=gen) * torch.rand(n, 1, generator=gen)
    labels = kmeans_labels(torch.randn(n, 8, generator=gen), (16, 16), 20, seed=seed)
    age = torch.randint(0, 5, (n,), generator=gen)
    assert torch.equal(select_tokens(delta, labels, age, n_keep, balance, first),
                       _loop_select(delta, labels, age, n_keep, balance, first))


def test_ties_go_to_the_lower_token_index():
    n = 64
    flat = torch.zeros(n, 4)  # every token changed alike and is as old as every other
    sel = select_tokens(flat, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), 10, 0.0, False)
    assert torch.equal(sel, torch.arange(10))


def test_rows_with_and_without_a_first_pruned_step_are_chosen_together():
    """A call whose rows reached pruning at different steps (a row key new to the run): each row follows
    its own first flag, as if chosen alone."""
    n, gen = 128, torch.Generator().manual_seed(7)
    delta = torch.randn(2, n, 8, generator=gen)
    labels = torch.stack([kmeans_labels(torch.randn(n, 8, generator=gen), (8, 16), 12) for _ in range(2)])
    age = torch.randint(0, 6, (2, n), generator=gen)
    both = select_tokens_batched(delta, labels, age, 40, 0.5, (True, False), cluster_counts(labels, 12))
    for row, first in enumerate((True, False)):
        assert torch.equal(both[row], _loop_select(delta[row], labels[row], age[row], 40, 0.5, first))

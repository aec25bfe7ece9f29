"""Core (host-free) tests of the SDTM method (kernels/sdtm.py) and of running a block on merged
tokens (kernels/families.py)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from tools.comfy_host import PACK_ROOT
import torch

from kernels.attention import ATTENTION_OVERRIDE_KEY, key_bias_hook, override_attention
from kernels.families import BlockSpec, ImageSpan, flux_family, image_span, mmdit_family, qwen_image_family
from kernels.block_runners import run_block_merged
from kernels.schedule import TokenRatioSchedule, block_depth
from kernels.methods import BY_KEY
from kernels.sdtm import EVERY_STEP_MERGED, SDTM, SDTMConfig
from kernels.token_ops import plan_from_targets, window_layout

# ---- SDTMConfig validation -------------------------------------------------------------------


def cfg(**kw) -> SDTMConfig:
    """The merging mechanics these tests check, at every step with 2x2 windows (no detail cache)."""
    return SDTMConfig(**{**EVERY_STEP_MERGED, **kw})


@pytest.mark.parametrize("preset", list(BY_KEY["sdtm"].presets))
def test_defaults_and_presets_validate(preset):
    BY_KEY["sdtm"].build(preset)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=0.8, ratio_adjust=False), r"ratio must lie in \[0, 0.75\]"),
    (dict(ratio=-0.1, ratio_adjust=False), r"ratio must lie in \[0, 0.75\]"),
    (dict(ratio=float("nan"), ratio_adjust=False), "ratio must lie"),
    (dict(ratio=0.7, deviation=0.2), r"ratio \+- deviation must stay in \[0, 0.75\]"),
    (dict(ratio=0.1, deviation=0.2), r"ratio \+- deviation must stay in \[0, 0.75\]"),
    (dict(ratio=0.3, deviation=-0.1, ratio_adjust=False), "deviation must be >= 0"),
    (dict(window=1), "window must be at least 2"),
    (dict(window=-3), "window must be at least 2"),
    (dict(switch_percent=1.5), r"switch_percent must lie in \[0, 1\]"),
    (dict(switch_percent=-0.01), r"switch_percent must lie in \[0, 1\]"),
    (dict(start_percent=-0.1), r"start_percent must lie in \[0, 1\]"),
    (dict(end_percent=1.2), r"end_percent must lie in \[0, 1\]"),
    (dict(end_percent=float("nan")), r"end_percent must lie in \[0, 1\]"),
    (dict(skip_first_blocks=-1), "skipped block counts"),
    (dict(skip_last_blocks=-2), "skipped block counts"),
])
def test_config_validate_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kwargs)  # a config validates on construction


def test_config_validate_window_zero_is_a_value_error():
    with pytest.raises(ValueError, match="window must be at least 2"):
        cfg(window=0)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(ratio=0.7, deviation=0.2, ratio_adjust=False),  # deviation unused without CRA
    dict(ratio=0.55, deviation=0.2),                      # 0.75 upper edge is allowed
    dict(ratio=0.2, deviation=0.2),                       # 0 lower edge is allowed
    dict(ratio=0.85, deviation=0.0, window=3),            # 3x3 windows allow up to 8/9
    dict(ratio=0.0, deviation=0.0),
    dict(switch_percent=0.0, start_percent=1.0, end_percent=1.0),
])
def test_config_validate_accepts(kwargs):
    SDTM(cfg(**kwargs))


# ---- SDTM.ratio ----------------------------------------------------------------------------

def cra(ratio, dev, p):
    return (ratio - dev) + 2 * dev * math.cos(p * math.pi / 2)


def test_ratio_follows_cosine_cra():
    m = SDTM(cfg(ratio=0.5, deviation=0.2, skip_first_blocks=1, skip_last_blocks=1, start_percent=0.0))
    assert m.ratio(1, 4, 0.0) == pytest.approx(0.7)
    assert m.ratio(1, 4, 1.0 - 1e-9) == pytest.approx(0.3, abs=1e-6)
    assert m.ratio(2, 4, 0.5) == pytest.approx(0.3 + 0.4 * math.cos(math.pi / 4))
    ps = [i / 50 for i in range(50)]
    rs = [m.ratio(2, 4, p) for p in ps]
    for p, r in zip(ps, rs):
        assert r == pytest.approx(cra(0.5, 0.2, p), abs=1e-12)
    assert all(b < a for a, b in zip(rs, rs[1:])), "the ratio decreases through denoising"
    # mean over progress is below `ratio` + deviation and above `ratio` - deviation
    assert 0.3 < sum(rs) / len(rs) < 0.7


def test_ratio_constant_without_cra():
    m = SDTM(cfg(ratio=0.42, deviation=0.3, ratio_adjust=False, skip_first_blocks=0, skip_last_blocks=0,
                        start_percent=0.0))
    for p in (0.0, 0.1, 0.5, 0.9, 0.999):
        for block in range(5):
            assert m.ratio(block, 5, p) == pytest.approx(0.42)


def test_ratio_zero_outside_start_end_window():
    m = SDTM(cfg(ratio=0.5, deviation=0.0, start_percent=0.2, end_percent=0.6,
                        skip_first_blocks=0, skip_last_blocks=0))
    assert m.ratio(0, 3, 0.0) == 0.0
    assert m.ratio(0, 3, 0.199) == 0.0
    assert m.ratio(0, 3, 0.2) == pytest.approx(0.5)     # start is inclusive
    assert m.ratio(0, 3, 0.599) == pytest.approx(0.5)
    assert m.ratio(0, 3, 0.6) == 0.0                     # end is exclusive
    assert m.ratio(0, 3, 0.9) == 0.0
    never = SDTM(cfg(start_percent=1.0))
    assert all(never.ratio(b, 6, p / 20) == 0.0 for b in range(6) for p in range(21))


def test_ratio_zero_for_skipped_blocks():
    m = SDTM(cfg(ratio=0.5, deviation=0.1, skip_first_blocks=2, skip_last_blocks=1))
    got = [m.ratio(b, 6, 0.3) > 0 for b in range(6)]
    assert got == [False, False, True, True, True, False]
    # everything skipped: never merges
    m = SDTM(cfg(skip_first_blocks=3, skip_last_blocks=3))
    assert all(m.ratio(b, 4, 0.1) == 0.0 for b in range(4))


def test_schedule_overrides_ratio_and_is_clamped():
    sched = TokenRatioSchedule(depth=[0.0, 1.0], progress=[0.0, 1.0], ratios=[[0.1, 0.2], [0.9, 0.4]])
    m = SDTM(cfg(ratio=0.5, deviation=0.2, skip_first_blocks=0, skip_last_blocks=1, start_percent=0.0),
             schedule=sched)
    nb = 5
    for block in range(nb - 1):
        for p in (0.0, 0.25, 0.6, 0.95):
            expected = min(sched.ratio(block_depth(block, nb), p), 0.75)
            assert m.ratio(block, nb, p) == pytest.approx(expected)
    assert m.ratio(0, nb, 0.0) == pytest.approx(0.1)           # CRA would say 0.7
    assert m.ratio(2, nb, 1.0 - 1e-9) == pytest.approx(0.3)    # CRA would say 0.3 too; depth 0.5
    assert m.ratio(1, nb, 0.5) == pytest.approx(0.25 * 0.65 + 0.75 * 0.15)
    assert m.ratio(nb - 1, nb, 0.0) == 0.0                     # skipped blocks stay skipped
    full = SDTM(cfg(skip_first_blocks=0, skip_last_blocks=0, start_percent=0.0), schedule=sched)
    assert full.ratio(nb - 1, nb, 0.0) == pytest.approx(0.75)  # 0.9 clamped to the 2x2 maximum
    late = SDTM(cfg(start_percent=0.5, skip_first_blocks=0, skip_last_blocks=0), schedule=sched)
    assert late.ratio(2, nb, 0.2) == 0.0                       # start/end still apply


# ---- stages and plans ----------------------------------------------------------------------

def _metric(b=2, n=64, c=16, seed=0):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed))


def _const_cfg(**kw):
    base = dict(ratio=0.5, ratio_adjust=False, skip_first_blocks=0, skip_last_blocks=0, switch_percent=0.4,
                start_percent=0.0)
    base.update(kw)
    return cfg(**base)


def test_stage_switch():
    m = SDTM(_const_cfg(switch_percent=0.4))
    assert m.stage(0.0) == "structure" and m.stage(0.399) == "structure"
    assert m.stage(0.4) == "detail" and m.stage(0.9) == "detail"


def test_structure_stage_merges_whole_windows():
    m = SDTM(_const_cfg())
    x = _metric()
    plan = m.plan(x, (8, 8), block=1, num_blocks=3, progress=0.1)
    # int(0.5 * 64) = 32 tokens asked; whole 2x2 windows remove 3 each: 10 windows, 30 tokens
    assert plan.n_out == 64 - 30
    idx, _ = window_layout((8, 8), (2, 2), torch.device("cpu"))
    windows = {tuple(w) for w in idx.tolist()}
    for row in range(2):
        assert set(plan.sizes[row].tolist()) == {1.0, 4.0}
        assert int((plan.sizes[row] == 4).sum()) == 10
        for slot in (plan.sizes[row] == 4).nonzero().reshape(-1).tolist():
            members = tuple((plan.assign[row] == slot).nonzero().reshape(-1).tolist())
            assert members in windows, "structure groups are exactly one K-token window"


def test_detail_stage_uses_fine_matching():
    m = SDTM(_const_cfg())
    x = _metric()
    plan = m.plan(x, (8, 8), block=1, num_blocks=3, progress=0.6)
    assert plan.n_out == 64 - 32, "detail stage removes exactly int(ratio * N) tokens"
    # fine matching: groups are not restricted to whole windows
    sizes = set(plan.sizes.reshape(-1).tolist())
    assert sizes - {1.0, 4.0}, f"expected groups of other sizes than 1 and K, got {sizes}"


def test_without_dynamic_merge_structure_stage_is_fine_matching():
    m = SDTM(_const_cfg(dynamic_merge=False))
    plan = m.plan(_metric(), (8, 8), block=1, num_blocks=3, progress=0.1)
    assert plan.n_out == 32


def test_plan_none_when_ratio_zero():
    m = SDTM(_const_cfg(start_percent=0.5))
    assert m.plan(_metric(), (8, 8), 1, 3, 0.2) is None
    m = SDTM(_const_cfg(ratio=0.0))
    assert m.plan(_metric(), (8, 8), 1, 3, 0.2) is None
    m = SDTM(_const_cfg(ratio=0.01))  # int(0.01 * 64) = 0
    assert m.plan(_metric(), (8, 8), 1, 3, 0.7) is None


def test_plan_3d_grid_uses_frame_windows():
    m = SDTM(_const_cfg())
    x = _metric(n=2 * 4 * 6)
    plan = m.plan(x, (2, 4, 6), block=0, num_blocks=2, progress=0.0)
    assert plan.n_out == 48 - 3 * (24 // 3)
    for row in range(2):
        for slot in (plan.sizes[row] == 4).nonzero().reshape(-1).tolist():
            members = (plan.assign[row] == slot).nonzero().reshape(-1)
            assert len(set((members // 24).tolist())) == 1, "a (1, 2, 2) window stays in one frame"


def test_plan_deterministic_and_varies_with_block_and_step():
    m = SDTM(_const_cfg())
    x = _metric()
    p1 = m.plan(x, (8, 8), 1, 3, 0.6)
    p2 = m.plan(x, (8, 8), 1, 3, 0.6)
    assert torch.equal(p1.assign, p2.assign) and torch.equal(p1.rep, p2.rep)
    blocks = {tuple(m.plan(x, (8, 8), b, 3, 0.6).rep[0].tolist()) for b in range(3)}
    steps = {tuple(m.plan(x, (8, 8), 1, 3, p).rep[0].tolist()) for p in (0.6, 0.65, 0.7)}
    assert len(blocks) > 1 and len(steps) > 1, "destinations move between blocks and steps"


def test_proportional_attention_weights_merged_keys_by_log_group_size():
    plan = SDTM(_const_cfg()).plan(_metric(), (8, 8), 1, 3, 0.6)
    bias = plan.log_sizes()
    assert torch.equal(bias, plan.sizes.log()) and bool((bias[plan.sizes == 1] == 0).all())
    assert SDTM(_const_cfg()).weighted_attention()
    assert not SDTM(_const_cfg(prompt_reweight=False)).weighted_attention()


# ---- run_block_merged -----------------------------------------------------------------------

FLUX = flux_family("Flux", 2, 2)
SD3 = mmdit_family("SD3", 3)
C = 8


def _plan_for(n_img, b=2, seed=0, num_remove=None):
    from kernels.token_ops import bipartite_merge_plan
    x = torch.randn(b, n_img, C, generator=torch.Generator().manual_seed(seed))
    return bipartite_merge_plan(x, (4, n_img // 4), (2, 2), num_remove or n_img // 2, seed=seed)


def _args(b, n_txt, n_img, n_ref=0, single=False, rope=True, seed=1, img_tokens=None):
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(b, n_txt, C, generator=g)
    img = img_tokens if img_tokens is not None else torch.randn(b, n_img, C, generator=g)
    ref = torch.randn(b, n_ref, C, generator=g)
    args = {"vec": torch.randn(b, C, generator=g), "transformer_options": {"marker": 1}, "attn_mask": None}
    if single:
        args["img"] = torch.cat([txt, img, ref], 1)
    else:
        args["img"] = torch.cat([img, ref], 1)
        args["txt"] = txt
    if rope:
        # ComfyUI's Flux repeats img_ids per batch row, so pe has the batch size at dim 0
        args["pe"] = torch.randn(b, 1, n_txt + n_img + n_ref, 2, 2, 2, generator=g)
    return args


def _flux_block_case(single, n_ref, b=2, n_txt=6, n_img=32):
    """Block arguments of a Flux double (or single) block, a merge plan and the image span."""
    args = _args(b, n_txt, n_img, n_ref, single=single)
    spec = BlockSpec(("single_block", 0) if single else ("double_block", 0), 0, single)
    return args, _plan_for(n_img), image_span(spec, args, n_img, n_txt, FLUX)


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("n_ref", [0, 5])
def test_a_block_that_updates_its_input_in_place_gives_the_same_result(single, n_ref):
    """ComfyUI's Flux blocks add their updates in place (img += ...); the merged path keeps what it needs
    after the block, so an in-place block and an out-of-place one give the same output."""
    args, plan, span = _flux_block_case(single, n_ref)
    before = args["img"].clone()
    weight = torch.randn(C, C, generator=torch.Generator().manual_seed(5))

    def out_of_place(a):
        return {"img": a["img"] + torch.tanh(a["img"] @ weight), **({"txt": a["txt"]} if "txt" in a else {})}

    def in_place(a):
        img = a["img"]
        img += torch.tanh(img @ weight)
        return {"img": img, **({"txt": a["txt"]} if "txt" in a else {})}

    want = run_block_merged(args, out_of_place, plan, span, FLUX)["img"]
    got = run_block_merged(args, in_place, plan, span, FLUX)["img"]
    assert torch.equal(got, want)
    assert torch.equal(args["img"], before), "the caller's tensor is not modified"


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("n_ref", [0, 5])
def test_identity_block_returns_input_exactly(single, n_ref):
    b, n_txt, n_img = 2, 6, 32
    args, plan, span = _flux_block_case(single, n_ref, b, n_txt, n_img)
    img_before = args["img"].clone()
    assert span == ImageSpan(n_txt if single else 0, n_img, 0 if single else n_txt, pe_dim=2)
    seen = {}

    def identity(a):
        seen.update(a)
        out = {"img": a["img"]}
        if "txt" in a:
            out["txt"] = a["txt"]
        return out

    out = run_block_merged(args, identity, plan, span, FLUX, key_bias=plan.sizes.log())
    assert torch.equal(out["img"], img_before), "an identity block must give back the input exactly"
    assert torch.equal(args["img"], img_before), "the caller's tensor is not modified"
    # the block saw M merged image tokens between the untouched text / reference tokens
    a = span.img_start
    assert seen["img"].shape[1] == args["img"].shape[1] - n_img + plan.n_out
    assert torch.equal(seen["img"][:, :a], args["img"][:, :a])
    assert torch.equal(seen["img"][:, a + plan.n_out:], args["img"][:, a + n_img:])
    torch.testing.assert_close(seen["img"][:, a:a + plan.n_out], plan.merge(args["img"][:, a:a + n_img]))
    # rotary entries: text and reference unchanged, image entries are the representatives'
    pe = args["pe"]
    p0 = n_txt
    assert seen["pe"].shape[2] == n_txt + plan.n_out + n_ref
    assert torch.equal(seen["pe"][:, :, :p0], pe[:, :, :p0])
    assert torch.equal(seen["pe"][:, :, p0:p0 + plan.n_out], plan.take_rep(pe[:, :, p0:p0 + n_img], dim=2))
    for row in range(b):
        assert torch.equal(seen["pe"][row, 0, p0:p0 + plan.n_out], pe[row, 0, p0 + plan.rep[row]])
    assert torch.equal(seen["pe"][:, :, p0 + plan.n_out:], pe[:, :, p0 + n_img:])
    # PR: the block's options carry the attention override; the caller's options are not mutated
    assert ATTENTION_OVERRIDE_KEY in seen["transformer_options"]
    assert seen["transformer_options"]["marker"] == 1
    assert ATTENTION_OVERRIDE_KEY not in args["transformer_options"]


def test_batch_shared_rope_table():
    b, n_txt, n_img = 2, 6, 32
    args = _args(b, n_txt, n_img)
    args["pe"] = args["pe"][:1]
    plan = _plan_for(n_img)
    out = run_block_merged(args, lambda a: {"img": a["img"], "txt": a["txt"]}, plan,
                           image_span(FLUX.blocks[0], args, n_img, n_txt, FLUX), FLUX)
    assert torch.equal(out["img"], args["img"])


def test_identity_block_without_rope_or_bias():
    b, n_txt, n_img = 2, 6, 32
    args = _args(b, n_txt, n_img, rope=False)
    before = args["img"].clone()
    plan = _plan_for(n_img)
    span = image_span(SD3.blocks[0], args, n_img, 0, SD3)
    seen = {}

    def identity(a):
        seen.update(a)
        return {"img": a["img"], "txt": a["txt"]}

    out = run_block_merged(args, identity, plan, span, SD3, key_bias=None)
    assert torch.equal(out["img"], before)
    assert torch.equal(out["txt"], args["txt"])
    assert ATTENTION_OVERRIDE_KEY not in seen["transformer_options"]
    assert "pe" not in seen


def _dyadic(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-16, 17, shape, generator=g).float() / 8


@pytest.mark.parametrize("single", [False, True])
def test_per_token_block_on_constant_groups_matches_unmerged(single):
    b, n_txt, n_img = 2, 5, 32
    plan = _plan_for(n_img, num_remove=20)
    img = plan.unmerge(_dyadic((b, plan.n_out, C), 3))  # tokens in a group are identical
    args = _args(b, n_txt, n_img, single=single, rope=True, img_tokens=img)
    w = torch.randn(C, C, generator=torch.Generator().manual_seed(5)) / C ** 0.5

    def per_token(a):  # position-independent, acts on every token alone
        out = {"img": torch.tanh(a["img"] @ w) + a["img"]}
        if "txt" in a:
            out["txt"] = torch.tanh(a["txt"] @ w)
        return out

    spec = BlockSpec(("single_block", 0) if single else ("double_block", 0), 0, single)
    span = image_span(spec, args, n_img, n_txt, FLUX)
    merged = run_block_merged(args, per_token, plan, span, FLUX, key_bias=None)
    full = per_token(args)
    torch.testing.assert_close(merged["img"], full["img"], rtol=1e-6, atol=1e-6)
    if not single:
        assert torch.equal(merged["txt"], full["txt"])
    # on non-constant groups the same block is NOT reproduced (the check above is not vacuous)
    args2 = _args(b, n_txt, n_img, single=single, seed=9)
    merged2 = run_block_merged(args2, per_token, plan, image_span(spec, args2, n_img, n_txt, FLUX), FLUX)
    assert not torch.allclose(merged2["img"], per_token(args2)["img"], atol=1e-3)


# ---- prompt reweighting: log(size) key bias == attention over the unmerged keys ----------------

HEADS = 2


def _sdpa(q, k, v, heads, mask=None, skip_reshape=False, **kwargs):
    if not skip_reshape:
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _joint_attention_block(skip_reshape):
    """A double block: joint attention of [txt, img] through the transformer_options override."""
    g = torch.Generator().manual_seed(11)
    wq, wk, wv = (torch.randn(C, C, generator=g) / C ** 0.5 for _ in range(3))

    def block(a):
        x = torch.cat([a["txt"], a["img"]], 1)
        q, k, v = x @ wq, x @ wk, x @ wv
        if skip_reshape:
            b, n, _ = q.shape
            q, k, v = (t.reshape(b, n, HEADS, -1).transpose(1, 2) for t in (q, k, v))
        override = (a.get("transformer_options") or {}).get(ATTENTION_OVERRIDE_KEY)
        if override is not None:
            o = override(_sdpa, q, k, v, HEADS, mask=None, skip_reshape=skip_reshape)
        else:
            o = _sdpa(q, k, v, HEADS, mask=None, skip_reshape=skip_reshape)
        n_t = a["txt"].shape[1]
        return {"txt": a["txt"] + o[:, :n_t], "img": a["img"] + o[:, n_t:]}

    return block


@pytest.mark.parametrize("skip_reshape", [False, True])
def test_key_bias_makes_merged_attention_exact_on_identical_tokens(skip_reshape):
    b, n_txt, n_img = 2, 6, 32
    plan = _plan_for(n_img, num_remove=24)
    assert float(plan.sizes.max()) > 2  # real groups
    img = plan.unmerge(torch.randn(b, plan.n_out, C, generator=torch.Generator().manual_seed(4)))
    args = _args(b, n_txt, n_img, rope=False, img_tokens=img)
    block = _joint_attention_block(skip_reshape)
    full = block(dict(args))
    span = image_span(SD3.blocks[0], args, n_img, 0, SD3)
    with_pr = run_block_merged(args, block, plan, span, SD3, key_bias=plan.sizes.log())
    torch.testing.assert_close(with_pr["img"], full["img"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_pr["txt"], full["txt"], rtol=1e-5, atol=1e-5)
    without_pr = run_block_merged(args, block, plan, span, SD3, key_bias=None)
    assert not torch.allclose(without_pr["txt"], full["txt"], atol=1e-4), \
        "without the bias, merged keys lose attention mass (so the check above is meaningful)"


def test_key_bias_override_chains_previous_and_combines_masks():
    calls = []

    def previous(func, *args, **kwargs):
        calls.append(kwargs.get("mask"))
        return func(*args, **kwargs)

    n_txt, m = 3, 4
    key_bias = torch.log(torch.tensor([[1.0, 2.0, 1.0, 4.0]]))
    to = override_attention({ATTENTION_OVERRIDE_KEY: previous, "x": 1}, key_bias_hook(key_bias, offset=n_txt, n_merged=m))
    assert to["x"] == 1 and to[ATTENTION_OVERRIDE_KEY] is not previous
    q = torch.randn(1, n_txt + m, 4)
    seen = {}

    def func(q, k, v, heads, mask=None, **kw):
        seen["mask"] = mask
        return q

    bool_mask = torch.ones(n_txt + m, n_txt + m, dtype=torch.bool)
    bool_mask[:, 0] = False
    to[ATTENTION_OVERRIDE_KEY](func, q, q, q, 1, mask=bool_mask)
    assert len(calls) == 1, "a previously installed override still runs"
    mask = seen["mask"]
    assert mask.shape == (1, 1, n_txt + m, n_txt + m)
    assert bool(torch.isinf(mask[..., 0]).all()) and bool((mask[..., 0] < 0).all())
    torch.testing.assert_close(mask[0, 0, 0, n_txt:], key_bias[0])
    assert bool((mask[0, 0, :, 1:n_txt] == 0).all())
    # a key length that fits neither the joint nor the image-only layout is left alone
    seen.clear()
    to[ATTENTION_OVERRIDE_KEY](func, q[:, :2], q[:, :2], q[:, :2], 1, mask=None)
    assert seen["mask"] is None
    # image-only attention (key count == merged count) gets the bias at offset 0
    to[ATTENTION_OVERRIDE_KEY](func, q[:, :m], q[:, :m], q[:, :m], 1, mask=None)
    torch.testing.assert_close(seen["mask"][0, 0, 0], key_bias[0])


def test_image_span_declines_unexpected_calls():
    spec = FLUX.blocks[0]
    args = _args(1, 4, 16)
    assert isinstance(image_span(spec, args, 16, 4, FLUX), ImageSpan)
    assert "16 tokens in the block" in image_span(spec, args, 17, 4, FLUX), "fewer tokens than the latent"
    assert image_span(spec, _args(1, 4, 3), 3, 4, FLUX) is None, "tiny latents run unmerged"
    masked = dict(args, attn_mask=torch.ones(1, 20, 20))
    assert image_span(spec, masked, 16, 4, FLUX) is None, "token masks run unmerged"
    wrong_pe = dict(args, pe=args["pe"][:, :, :10])
    assert "rotary table" in image_span(spec, wrong_pe, 16, 4, FLUX), "a rope table that does not fit is refused"


@pytest.mark.parametrize("pe_axis", [1, 2])
def test_rope_token_axis_is_read_from_the_table(pe_axis):
    """Qwen-Image's table moved from (B, L, 1, ...) to (B, 1, L, ...) between host versions: both merge alike."""
    qwen = qwen_image_family("QwenImage", 1)
    b, n_txt, n_img = 2, 6, 32
    args = _args(b, n_txt, n_img)
    if pe_axis == 1:
        args["pe"] = args["pe"].transpose(1, 2)
    span = image_span(qwen.blocks[0], args, n_img, n_txt, qwen)
    assert span.pe_dim == pe_axis
    plan = _plan_for(n_img)
    seen = {}

    def identity(a):
        seen["pe"] = a["pe"]
        return {"img": a["img"], "txt": a["txt"]}

    out = run_block_merged(args, identity, plan, span, qwen)
    assert torch.equal(out["img"], args["img"])
    pe = args["pe"].transpose(1, 2) if pe_axis == 1 else args["pe"]
    got = seen["pe"].transpose(1, 2) if pe_axis == 1 else seen["pe"]
    assert torch.equal(got[:, :, n_txt:n_txt + plan.n_out], plan.take_rep(pe[:, :, n_txt:n_txt + n_img], dim=2))


def test_families():
    assert [s.key for s in FLUX.blocks] == [("double_block", 0), ("double_block", 1),
                                           ("single_block", 0), ("single_block", 1)]
    assert [s.index for s in FLUX.blocks] == [0, 1, 2, 3]
    assert [s.text_in_img for s in FLUX.blocks] == [False, False, True, True]
    assert FLUX.has_rope and not SD3.has_rope and SD3.num_blocks == 3


def test_plan_from_targets_helper_in_block():
    # hand plan: merge image tokens (0,1) and (2,3), identity block still exact
    target = torch.tensor([[0, 0, 2, 2, 4, 5, 6, 7]])
    plan = plan_from_targets(target, 6)
    args = _args(1, 2, 8, rope=True)
    before = args["img"].clone()
    out = run_block_merged(args, lambda a: {"img": a["img"], "txt": a["txt"]}, plan,
                           image_span(FLUX.blocks[0], args, 8, 2, FLUX), FLUX, plan.sizes.log())
    assert torch.equal(out["img"], before)


def test_kernels_import_nothing_from_comfyui():
    """The kernels are host-independent: importing all of them loads no ComfyUI module."""
    root = PACK_ROOT
    modules = sorted(p.stem for p in (root / "kernels").glob("*.py") if p.stem != "__init__")
    code = ("import sys, importlib; sys.path.insert(0, %r)\n"
            f"for m in {modules!r}: importlib.import_module('kernels.' + m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'nodes', 'folder_paths'))\n"
            "assert not bad, bad\n") % str(root)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr

"""Host tests: the SDTM node on tiny random models of ComfyUI's own Flux and SD3 classes.

Every test takes the `host` fixture (skips with the reason when no ComfyUI is found). Models are
tiny and randomly initialised, so the numbers here check plumbing and bounds, not image quality.
"""
from __future__ import annotations

import logging
import re

import pytest
import torch

FAMILIES = ["flux", "sd3"]
SD3_DEPTH = 4  # 4 joint blocks: with the default skip of 1 first / 1 last, 2 blocks merge

# Relative L2 to the unpatched output with every-step merging (the `merging` fixture), same seed, 128x128 px,
# 6 euler steps, CFG 3: set from measurements on these random models, well below the distance between two
# noise seeds. Random weights amplify every perturbation, so these check plumbing, not image quality
# (that is measured on the trained reference models, tests/evidence).
REL_L2_BOUND = {"flux": 0.40, "sd3": 0.10}
MIN_DIFFERENCE = 1e-3  # the patch must actually change something at defaults


def build(host, family, dtype=None, seed=0):
    if family == "flux":
        return host.tiny_flux(seed=seed, dtype=dtype)
    return host.tiny_sd3(seed=seed, depth=SD3_DEPTH, dtype=dtype)


@pytest.fixture(scope="module")
def sdtm_node(host):
    return host.pack_nodes()["SDTMPatchModel"]


@pytest.fixture(scope="module")
def defaults(host, sdtm_node):
    """The node's widget defaults, read from its schema (what a user gets without touching anything)."""
    return host.node_inputs(sdtm_node)


@pytest.fixture(scope="module")
def merging(host, sdtm_node):
    """Merging at every step after a short warm-up, no detail cache: the mechanics most tests here check
    (the defaults' full refresh steps would hide them)."""
    return host.every_step_inputs(sdtm_node)


def patch(host, node, model, **kwargs):
    (out,) = host.run_node(node, model=model, **kwargs)
    return out


def rel_l2(a, b):
    return float((b.float() - a.float()).norm() / a.float().norm())


def rel_mae(a, b):
    return float((b.float() - a.float()).abs().mean() / a.float().abs().mean())


# ---- snapshot of a MODEL's observable state --------------------------------------------------

def _structure(obj, tensors):
    if isinstance(obj, dict):
        return {"__dict__": sorted(((repr(k), _structure(v, tensors)) for k, v in obj.items()), key=lambda kv: kv[0])}
    if isinstance(obj, (list, tuple)):
        return [type(obj).__name__, [_structure(v, tensors) for v in obj]]
    if isinstance(obj, torch.Tensor):
        tensors.append(obj.detach().clone())
        return ("tensor", tuple(obj.shape), str(obj.dtype), len(tensors) - 1)
    if callable(obj):
        return ("callable", id(obj))
    return ("value", repr(obj))


def snapshot(model):
    tensors: list = []
    struct = {
        "model_options": _structure(model.model_options, tensors),
        "wrappers": _structure(model.wrappers, tensors),
        "callbacks": _structure(model.callbacks, tensors),
        "object_patches": sorted(model.object_patches),
        "patches": sorted(model.patches),
        "attachments": sorted(model.attachments),
        "injections": sorted(model.injections),
    }
    sd = {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    return struct, tensors, sd


def assert_same_snapshot(a, b):
    sa, ta, da = a
    sb, tb, db = b
    assert sa == sb, "model_options / wrappers / patches structure changed"
    assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))
    assert da.keys() == db.keys()
    for k in da:
        assert torch.equal(da[k], db[k]), f"diffusion model weight {k} changed"


# ---- run statistics (the pack's end-of-run log line) ----------------------------------------

# The run summary kernels.runtime.RunStats.summary logs at the end of every sampling run.
SUMMARY = re.compile(r"image tokens computed (?P<computed>[\d.]+)% of unpatched .*; (?P<reduced>\d+) of "
                     r"(?P<calls>\d+) block calls reduced")


def run_with_stats(host, model, caplog, **kw):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="token_reduction"):
        out = host.sample(model, **kw)
    found = [SUMMARY.search(r.getMessage()) for r in caplog.records if r.name == "token_reduction"]
    found = [m for m in found if m]
    assert len(found) == 1, f"expected one run summary, got {[r.getMessage() for r in caplog.records]}"
    computed, calls, reduced = float(found[0]["computed"]), int(found[0]["calls"]), int(found[0]["reduced"])
    return out, computed, calls, reduced


# ---- basic behaviour -------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_patch_runs_and_reduces_tokens(host, sdtm_node, merging, family, caplog):
    model = build(host, family)
    patched = patch(host, sdtm_node, model, **merging)
    assert patched is not model
    out, computed, calls, reduced = run_with_stats(host, patched, caplog, height=128, width=128)
    assert out.shape == (1, 16, 16, 16) and torch.isfinite(out).all()
    n_blocks = 4 if family == "flux" else SD3_DEPTH
    # every block reports once per model call: 6 steps, cond+uncond batched (or split: 12 calls)
    assert calls in (6 * n_blocks, 12 * n_blocks)
    # The first step (progress 0, below start_percent) runs at full density, then every block of every
    # call merges.
    assert reduced % n_blocks == 0 and n_blocks <= reduced <= calls - calls // 6, (reduced, calls)
    assert computed < 85.0, "a real share of image tokens was merged away"
    # Skipped blocks stay whole in every call.
    skipping = patch(host, sdtm_node, model, **dict(merging, start_percent=0.0, skip_first_blocks=1,
                                                     skip_last_blocks=1))
    _, _, calls, reduced = run_with_stats(host, skipping, caplog, height=128, width=128)
    assert reduced * n_blocks == calls * (n_blocks - 2), "every call merges in all but the skipped first/last block"


@pytest.mark.parametrize("family", FAMILIES)
def test_start_percent_one_is_bit_identical(host, sdtm_node, defaults, family):
    model = build(host, family)
    base = host.sample(model, height=128, width=128)
    patched = patch(host, sdtm_node, model, **dict(defaults, start_percent=1.0))
    assert torch.equal(host.sample(patched, height=128, width=128), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_differs_but_stays_close(host, sdtm_node, merging, family):
    model = build(host, family)
    base = host.sample(model, height=128, width=128)
    out = host.sample(patch(host, sdtm_node, model, **merging), height=128, width=128)
    err, mae = rel_l2(base, out), rel_mae(base, out)
    other_seed = rel_l2(base, host.sample(model, seed=1, height=128, width=128))
    assert MIN_DIFFERENCE < err < REL_L2_BOUND[family], f"relative L2 {err:.4f}"
    assert mae < REL_L2_BOUND[family], f"relative mean-abs error {mae:.4f}"
    assert err < 0.5 * other_seed, "merging error must be far below the distance between two seeds"


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_refresh_with_a_full_step(host, sdtm_node, defaults, family, caplog):
    """The defaults' detail cache: the first call is full (nothing cached yet), then two merged steps per
    full refresh step; the output differs from unpatched and stays far from another seed's."""
    model = build(host, family)
    base = host.sample(model, height=128, width=128)
    every_call = dict(defaults, start_percent=0.0, skip_first_blocks=1, skip_last_blocks=1)
    out, _, calls, reduced = run_with_stats(host, patch(host, sdtm_node, model, **every_call), caplog,
                                            height=128, width=128)
    n_blocks = 4 if family == "flux" else SD3_DEPTH
    assert defaults["refresh_every"] == 2
    assert reduced * n_blocks * 6 == calls * (n_blocks - 2) * 4, "steps 1, 2, 4, 5 of 6 merge; 0 and 3 are full"
    out = host.sample(patch(host, sdtm_node, model, **defaults), height=128, width=128)
    err = rel_l2(base, out)
    assert MIN_DIFFERENCE < err < 0.5 * rel_l2(base, host.sample(model, seed=1, height=128, width=128)), err


@pytest.mark.parametrize("family", FAMILIES)
def test_input_model_unchanged(host, sdtm_node, defaults, family):
    model = build(host, family)
    base = host.sample(model, height=128, width=128)
    before = snapshot(model)
    patched = patch(host, sdtm_node, model, **defaults)
    assert_same_snapshot(before, snapshot(model))
    # the patch lives on the clone only
    dit = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    n_blocks = 4 if family == "flux" else SD3_DEPTH
    assert len(dit) == n_blocks
    assert "patches_replace" not in model.model_options["transformer_options"]
    import comfy.patcher_extension as pe
    for kind in (pe.WrappersMP.APPLY_MODEL, pe.WrappersMP.OUTER_SAMPLE):
        assert patched.get_wrappers(kind, "sdtm") and not model.get_wrappers(kind, "sdtm")
    patched_before = snapshot(patched)
    host.sample(patched, height=128, width=128)
    assert_same_snapshot(before, snapshot(model))
    assert_same_snapshot(patched_before, snapshot(patched))  # per-run state does not leak into the MODEL
    assert torch.equal(host.sample(model, height=128, width=128), base), \
        "the unpatched model still samples bit-identically"


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_are_deterministic(host, sdtm_node, defaults, family):
    model = build(host, family)
    patched = patch(host, sdtm_node, model, **defaults)
    a = host.sample(patched, height=128, width=128)
    b = host.sample(patched, height=128, width=128)
    assert torch.equal(a, b)
    again = patch(host, sdtm_node, model, **defaults)  # a second node execution
    assert torch.equal(host.sample(again, height=128, width=128), a)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_two(host, sdtm_node, merging, family, caplog):
    model = build(host, family)
    base = host.sample(model, batch=2, height=128, width=128)
    out, computed, _, reduced = run_with_stats(host, patch(host, sdtm_node, model, **merging), caplog,
                                               batch=2, height=128, width=128)
    assert out.shape == base.shape == (2, 16, 16, 16)
    assert torch.isfinite(out).all() and reduced > 0
    for row in range(2):  # measured per row: Flux 0.25 - 0.27, SD3 0.050 - 0.053
        assert MIN_DIFFERENCE < rel_l2(base[row], out[row]) < REL_L2_BOUND[family]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("latent_hw", [(10, 14), (9, 11)], ids=["grid5x7", "odd_latent9x11"])
def test_token_grid_not_a_multiple_of_the_window(host, sdtm_node, merging, family, latent_hw, caplog):
    # (10, 14) latent -> 5 x 7 tokens; (9, 11) latent is padded by the model -> 5 x 6 tokens.
    # Either way the 2x2 windows leave a ragged border. Measured rel. L2: Flux 0.21 - 0.24, SD3 0.050 - 0.057.
    h, w = latent_hw
    model = build(host, family)
    base = host.sample(model, height=8 * h, width=8 * w)
    out, computed, _, reduced = run_with_stats(host, patch(host, sdtm_node, model, **merging), caplog,
                                               height=8 * h, width=8 * w)
    assert out.shape == base.shape == (1, 16, h, w)
    assert torch.isfinite(out).all()
    assert reduced > 0 and computed < 90.0
    assert MIN_DIFFERENCE < rel_l2(base, out) < REL_L2_BOUND[family]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_models(host, sdtm_node, merging, family, dtype):
    model = build(host, family, dtype=dtype)
    assert next(model.model.diffusion_model.parameters()).dtype == dtype
    base = host.sample(model, height=128, width=128)
    out = host.sample(patch(host, sdtm_node, model, **merging), height=128, width=128)
    assert torch.isfinite(base).all() and torch.isfinite(out).all()
    # measured: same as fp32 within 0.01 (Flux 0.27 - 0.28, SD3 0.051)
    assert MIN_DIFFERENCE < rel_l2(base, out) < REL_L2_BOUND[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_img2img_denoise_below_one(host, sdtm_node, merging, family):
    model = build(host, family)
    latent = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    base = host.sample(model, latent=latent, denoise=0.5)
    out = host.sample(patch(host, sdtm_node, model, **merging), latent=latent, denoise=0.5)
    assert torch.isfinite(out).all()
    # Every step of this run is past start_percent, so all of them merge (bounds looser than at full denoise).
    assert MIN_DIFFERENCE < rel_l2(base, out) < {"flux": 0.6, "sd3": 0.2}[family]
    # Progress is read from sigma: with denoise 0.5 the first step is already ~50% through the full
    # schedule, so a patch that ends at 30% never merges (a step counter would say 0% and merge).
    late = patch(host, sdtm_node, model, **dict(merging, end_percent=0.3))
    assert torch.equal(host.sample(late, latent=latent, denoise=0.5), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_chains_an_existing_block_replacement(host, sdtm_node, merging, family):
    model = build(host, family)
    calls = []

    def counting(args, extra):
        calls.append(args["img"].shape[1])
        return extra["original_block"](args)

    pre = model.clone()
    pre.set_model_patch_replace(counting, "dit", "double_block", 1)
    base = host.sample(pre, height=128, width=128)
    n_base = len(calls)
    assert n_base in (6, 12)  # one call per step (cond+uncond batched), or two if the host splits them
    calls.clear()
    # SDTM inactive: the earlier replacement still runs beneath it, output unchanged
    off = patch(host, sdtm_node, pre, **dict(merging, start_percent=1.0))
    assert torch.equal(host.sample(off, height=128, width=128), base)
    assert len(calls) == n_base
    calls.clear()
    on = patch(host, sdtm_node, pre, **dict(merging, start_percent=0.0))  # merging from the first step
    host.sample(on, height=128, width=128)
    assert len(calls) == n_base
    img_tokens = 64  # 8 x 8 tokens; block 1 merges, so the chained block sees fewer image tokens
    assert all(c < img_tokens for c in calls), calls


# ---- FLOPs ----------------------------------------------------------------------------------

def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(host, model, after_a_run: bool = False, **kw):
    """Per-module FLOPs of one sampling run. CPU SDPA (the fused flash kernel) has no formula in
    FlopCounterMode, so attention would count as 0; register the standard 4*B*H*Sq*Sk*D one.
    `after_a_run`: count the second of two runs (a patch's first call of a shape probes the text order on two
    tokens of one double block, kernels.families.probe_text_first: a cost outside the block accounting)."""
    from torch.utils.flop_counter import FlopCounterMode
    if after_a_run:
        host.sample(model, **kw)
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flops
    mode = FlopCounterMode(display=False, custom_mapping=mapping)
    with mode:
        host.sample(model, **kw)
    return {k: sum(v.values()) for k, v in mode.get_flop_counts().items()}, mode.get_total_flops()


def _block_modules(family, dm):
    if family == "flux":
        return [(f"double_blocks.{i}", b) for i, b in enumerate(dm.double_blocks)] + \
               [(f"single_blocks.{i}", b) for i, b in enumerate(dm.single_blocks)]
    return [(f"joint_blocks.{i}", b) for i, b in enumerate(dm.joint_blocks)]


def predicted_block_flops(block, n_img, n_txt):
    """FLOPs of one block call for one batch row, from token counts alone: every Linear costs
    2*in*out per token it sees (modulation sees the one conditioning vector, image/text linears
    their own tokens, single-stream linears both), joint attention 4*hidden*(queries*keys)."""
    total, hidden = 0, None
    for name, mod in block.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        head = name.split(".")[0]
        if "mod" in name:  # img_mod.lin, txt_mod.lin, modulation.lin, *.adaLN_modulation.1
            tokens = 1
        elif head.startswith("img_") or head == "x_block":
            tokens = n_img
        elif head.startswith("txt_") or head == "context_block":
            tokens = n_txt
        else:  # single-stream linear1 / linear2
            tokens = n_img + n_txt
        total += 2 * mod.in_features * mod.out_features * tokens
        if hidden is None and (name.endswith("qkv") or name == "linear1"):
            hidden = mod.in_features
    length = n_img + n_txt
    return total + 4 * hidden * length * length


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dynamic_merge", [False, True], ids=["bipartite", "structure_then_detail"])
def test_flops_follow_token_counts(host, sdtm_node, merging, family, dynamic_merge):
    steps, px, n_txt = 2, 256, 16           # 256 px -> 32x32 latent -> 16x16 = 256 image tokens
    n = (px // 16) ** 2
    model = build(host, family)
    dm = model.model.diffusion_model
    prefix = type(dm).__name__
    cfg = dict(merging, ratio=0.5, ratio_adjust=False, skip_first_blocks=0, skip_last_blocks=0,
               dynamic_merge=dynamic_merge, switch_percent=0.4, start_percent=0.0)
    base, base_total = count_flops(host, model, steps=steps, height=px, width=px, context_len=n_txt)
    pat, pat_total = count_flops(host, patch(host, sdtm_node, model, **cfg), after_a_run=True, steps=steps, height=px,
                                 width=px, context_len=n_txt)
    # Image tokens each block computes per model call. Ratio 0.5 asks int(0.5 * 256) = 128 removals:
    # bipartite removes exactly 128 -> 128 tokens; whole 2x2 windows remove 3 each, 42 windows ->
    # 130 tokens. With 2 euler steps the calls sit at progress 0 (structure) and ~0.5 (detail).
    m_per_call = [130, 128] if dynamic_merge else [128, 128]
    rows = 2  # cond + uncond in one batch per call
    blocks = _block_modules(family, dm)
    saved = 0
    for name, block in blocks:
        f_full = predicted_block_flops(block, n, n_txt)
        # the formula reproduces the unpatched count exactly (so it is the right cost model) ...
        assert base[f"{prefix}.{name}"] == rows * steps * f_full, name
        # ... and the patched blocks cost exactly what their merged token counts predict
        expected = rows * sum(predicted_block_flops(block, m, n_txt) for m in m_per_call)
        assert pat[f"{prefix}.{name}"] == expected, name
        saved += rows * steps * f_full - expected
    # Whole run: non-block FLOPs (embedders, final layer) are unchanged, so patched = baseline - the
    # block savings + the matching cost. Bipartite matching adds one (n - n_win) x n_win similarity
    # matmul per merged block call and row (2 * 192 * 64 * hidden); window scoring adds no matmul.
    c = dm.double_blocks[0].hidden_size if family == "flux" else dm.joint_blocks[0].x_block.attn.qkv.in_features
    n_win = n // 4
    detail_calls = sum(1 for m in m_per_call if m == n - n // 2)
    overhead = rows * len(blocks) * detail_calls * 2 * (n - n_win) * n_win * c
    predicted_total = base_total - saved + overhead
    assert abs(pat_total - predicted_total) <= 0.002 * base_total, (pat_total, predicted_total)
    # Band from the ratio alone (measured: Flux 0.474 bipartite / 0.461 structure+detail, SD3 0.506 /
    # 0.503). Per block, image-token linears scale by 128/256 = 0.5 while text tokens and modulation
    # stay, so linears cost at most (128 + 16 + 1) / (256 + 16 + 1) = 0.53x; attention scales by
    # ((16 + 128) / (16 + 256))^2 = 0.28x. So blocks cost between 0.28x and 0.53x their baseline. On top
    # come the unchanged embedders / final layer (2.3% of the Flux baseline here, <1% for SD3) and the
    # matching overhead (3.4% for Flux, whose hidden size is only 64; 1.2% for SD3).
    ratio = pat_total / base_total
    assert 0.28 < ratio < (0.60 if family == "flux" else 0.56), ratio


# ---- rejected inputs ------------------------------------------------------------------------

def _tiny_pixart(host):
    """PixArt (PixArtMS): ComfyUI 0.3.64 gives its blocks no per-block hook and no transformer_options."""
    import comfy.supported_models
    cfg = {"image_model": "pixart_sigma", "input_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 64,
           "depth": 1, "num_heads": 2, "caption_channels": 32, "model_max_length": 16, "micro_condition": False}
    return host._build(comfy.supported_models.PixArtSigma(cfg), 0, torch.float32)


def test_unsupported_model_is_rejected_with_a_clear_error(host, sdtm_node, defaults):
    model = _tiny_pixart(host)
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        patch(host, sdtm_node, model, **defaults)
    err = info.value
    assert type(err).__name__ == "UnsupportedModelError"
    msg = str(err)
    assert "PixArtMS" in msg and "SDTM" in msg and "no per-block hook" in msg
    for family in ("Flux", "Chroma", "SD3", "Wan", "Qwen-Image", "HunyuanVideo", "Lumina"):
        assert family in msg, msg
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_out_of_range_inputs_raise_and_leave_the_model_alone(host, sdtm_node, merging, family):
    model = build(host, family)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"ratio \+- deviation must stay in \[0, 0\.75\].*0\.7.*0\.2"):
        patch(host, sdtm_node, model, **dict(merging, ratio=0.7, deviation=0.2))
    with pytest.raises(ValueError, match=r"end_percent must lie in \[0, 1\]"):
        patch(host, sdtm_node, model, **dict(merging, end_percent=1.5))
    assert_same_snapshot(before, snapshot(model))
    # the same ratio without CRA is valid (deviation unused)
    ok = patch(host, sdtm_node, model, **dict(merging, ratio=0.7, deviation=0.2, ratio_adjust=False))
    assert torch.isfinite(host.sample(ok)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_detail_cache_needs_a_full_call_first(host, sdtm_node, merging, family):
    """A merged call leans on the last full call: with merging from the first step and no refresh step there
    is none, so the output equals the run without the cache (bit for bit); after a full warm-up it changes."""
    model = build(host, family)
    kw = dict(height=128, width=128)
    plain = dict(merging, refresh_every=0)
    off = host.sample(patch(host, sdtm_node, model, **dict(plain, start_percent=0.0)), **kw)
    on = host.sample(patch(host, sdtm_node, model, **dict(plain, start_percent=0.0, detail_cache=True)), **kw)
    assert torch.equal(on, off)
    cached = host.sample(patch(host, sdtm_node, model, **dict(plain, detail_cache=True)), **kw)
    assert torch.isfinite(cached).all() and not torch.equal(cached, host.sample(patch(host, sdtm_node, model,
                                                                                      **plain), **kw))


def test_a_few_step_run_says_fewer_steps_may_serve_as_well(host, sdtm_node, defaults, caplog, monkeypatch):
    """Through the node and ComfyUI's sampler: the sampler's own sigmas tell the run's length."""
    import importlib
    runtime = importlib.import_module(f"{host.PACK_NAME}.kernels.runtime")  # the pack as ComfyUI loaded it
    monkeypatch.setattr(runtime, "_warned", set())
    model = patch(host, sdtm_node, build(host, "flux"), **defaults)
    with caplog.at_level(logging.WARNING, logger="token_reduction"):
        host.sample(model, steps=runtime.FEW_STEPS + 1)
        assert not [r for r in caplog.records if "fewer steps" in r.getMessage()]
        host.sample(model, steps=4)
    assert [r.getMessage() for r in caplog.records if "fewer steps" in r.getMessage()] == [
        "SDTM: at 4 steps, simply sampling fewer steps does about as well as this node at the same work (see "
        "'Few-step models' in the pack's README)."]

"""Host tests of the Wan and Qwen-Image adapters: SDTM through ComfyUI's own model classes.

Every test takes the `host` fixture and skips, with the reason, without a ComfyUI checkout.
"""
import logging

import torch

from test_host_layouts import _patched_with_spy
from test_host_sdtm import SUMMARY, assert_same_snapshot, snapshot

SDTM_DEFAULTS = dict(ratio=0.5, deviation=0.2, switch_percent=0.4, window=2, skip_first_blocks=0,
                     skip_last_blocks=0, dynamic_merge=True, ratio_adjust=True, prompt_reweight=True,
                     start_percent=0.0, end_percent=1.0)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check_family(host, model, latent, grid, bound, **sample_kw):
    """Identity window exact, only the latent's tokens merged on the right grid, output close to
    unpatched, input MODEL untouched."""
    baseline = host.sample(model, latent=latent, **sample_kw)
    nodes = host.pack_nodes()
    before = snapshot(model)
    (identity,) = host.run_node(nodes["SDTMPatchModel"], model=model, **{**SDTM_DEFAULTS, "start_percent": 1.0})
    assert torch.equal(host.sample(identity, latent=latent, **sample_kw), baseline)
    (patched,) = host.run_node(nodes["SDTMPatchModel"], model=model, **SDTM_DEFAULTS)
    out = host.sample(patched, latent=latent, **sample_kw)
    assert_same_snapshot(before, snapshot(model))
    assert torch.isfinite(out).all() and out.shape == baseline.shape
    rel = _rel(out, baseline)
    assert 1e-3 < rel < bound, rel
    spied, spy = _patched_with_spy(host, model)
    host.sample(spied, latent=latent, **sample_kw)
    n_img = 1
    for g in grid:
        n_img *= g
    assert spy.seen and set(spy.seen) == {(n_img, grid)}, set(spy.seen)
    return rel


def test_wan_video_merges_on_the_frame_grid(host):
    """Wan: a 3-frame latent with an odd spatial grid (5x7 tokens) merges on the (T, H, W) grid; text
    is cross-attention and stays whole. Measured rel L2 at defaults (random weights): about 0.1."""
    model = host.tiny_wan()
    latent = torch.zeros(1, 16, 3, 10, 14)
    _check_family(host, model, latent, (3, 5, 7), bound=0.40)


def test_wan_batch_and_cfg_separate_calls_agree(host, monkeypatch):
    import comfy.model_management
    model = host.tiny_wan()
    patched, _ = _patched_with_spy(host, model)
    latent = torch.zeros(2, 16, 2, 8, 8)
    batched = host.sample(patched, latent=latent)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 1)
    separate = host.sample(patched, latent=latent)
    assert torch.allclose(batched, separate, rtol=1e-4, atol=1e-4), (batched - separate).abs().max()


def test_qwen_image_merges_only_latent_tokens(host):
    """Qwen-Image: joint attention over cat(txt, img); merged on the (1, H, W) grid."""
    model = host.tiny_qwen_image()
    latent = torch.zeros(1, 16, 1, 16, 12)
    _check_family(host, model, latent, (1, 8, 6), bound=0.40)


def test_qwen_image_edit_reference_tokens_are_never_merged(host):
    """Qwen-Image-Edit appends reference-latent tokens after the latent's: only the latent's merge."""
    import comfy.sample
    model = host.tiny_qwen_image()
    patched, spy = _patched_with_spy(host, model)
    gen = torch.Generator().manual_seed(5)
    ref = torch.randn(1, 16, 1, 12, 8, generator=gen)
    conds = [[[torch.randn(1, 16, 32, generator=gen), {"reference_latents": [ref]}]] for _ in range(2)]
    latent = torch.zeros(1, 16, 1, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 3)
    base = comfy.sample.sample(model, noise, 4, 3.0, "euler", "simple", conds[0], conds[1], latent,
                               disable_pbar=True, seed=3)
    out = comfy.sample.sample(patched, noise, 4, 3.0, "euler", "simple", conds[0], conds[1], latent,
                              disable_pbar=True, seed=3)
    assert spy.seen and set(spy.seen) == {(64, (1, 8, 8))}, set(spy.seen)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert _rel(out, base) < 0.40


def _node_defaults(node):
    return {i.id: i.default for i in node.define_schema().inputs
            if i.id != "model" and not getattr(i, "optional", False)}


def test_density_schedule_on_wan_and_qwen_image(host):
    """The density node pools per latent frame on Wan's (T, H, W) grid and on Qwen-Image's (1, H, W)
    grid: identity window exact, output finite and near unpatched, input MODEL untouched."""
    node = host.pack_nodes()["TokenDensityPatchModel"]
    d = _node_defaults(node)
    for model, latent in ((host.tiny_wan(layers=4), torch.zeros(1, 16, 2, 10, 14)),
                          (host.tiny_qwen_image(layers=4), torch.zeros(1, 16, 1, 16, 12))):
        base = host.sample(model, latent=latent)
        before = snapshot(model)
        (identity,) = host.run_node(node, model=model, **{**d, "start_percent": 1.0})
        assert torch.equal(host.sample(identity, latent=latent), base)
        (patched,) = host.run_node(node, model=model, **d)
        out = host.sample(patched, latent=latent)
        assert_same_snapshot(before, snapshot(model))
        assert torch.isfinite(out).all()
        assert 1e-3 < _rel(out, base) < 0.45, _rel(out, base)


def test_cat_on_wan_and_qwen_image(host, monkeypatch, caplog):
    """CAT on the (T, H, W) grids of Wan and Qwen-Image: identity window exact, only a fraction of the
    tokens computed in pruned steps, output finite and near unpatched, input MODEL untouched, and
    cond/uncond batched or called one by one agree (the cache is per conditioning and row)."""
    import comfy.model_management
    node = host.pack_nodes()["CATPruningPatchModel"]
    d = _node_defaults(node)
    for model, latent in ((host.tiny_wan(layers=3), torch.zeros(1, 16, 3, 10, 14)),
                          (host.tiny_qwen_image(layers=3), torch.zeros(1, 16, 1, 16, 12))):
        kw = dict(latent=latent, steps=8)
        base = host.sample(model, **kw)
        before = snapshot(model)
        (identity,) = host.run_node(node, model=model, **{**d, "start_percent": 1.0})
        assert torch.equal(host.sample(identity, **kw), base)
        (patched,) = host.run_node(node, model=model, **d)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="token_reduction"):
            out = host.sample(patched, **kw)
        found = [m for m in (SUMMARY.search(r.getMessage()) for r in caplog.records) if m]
        assert len(found) == 1 and 40.0 < float(found[0].group(1)) < 90.0, [r.getMessage() for r in caplog.records]
        assert_same_snapshot(before, snapshot(model))
        assert torch.isfinite(out).all()
        assert 1e-3 < _rel(out, base) < 0.6, _rel(out, base)
        with monkeypatch.context() as m:
            m.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 1)
            separate = host.sample(patched, **kw)
        assert torch.allclose(out, separate, rtol=1e-4, atol=1e-4), (out - separate).abs().max()

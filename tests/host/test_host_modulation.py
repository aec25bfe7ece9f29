"""Reference tokens with a modulation of their own, on the host's own models configured that way.

Qwen-Image-Edit 2511 (its checkpoint's __index_timestep_zero__ tensor makes detection default to that
reference mode) and Flux 2 with index_timestep_zero modulate the reference tokens at timestep zero inside
the host's block wrapper, where the pack cannot shift the ranges: every method runs them unreduced, with
one warning, and gives exactly the unpatched result. Z-Image with reference images names the ranges as a
layer argument (timestep_zero_index): reduced calls keep them on the same tokens.

Every test skips, with the reason, without a ComfyUI checkout or on a host without that mode.
"""
import importlib
import logging

import pytest
import torch

from tools import comfy_host

REF = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(1))
METHODS = ("SDTMPatchModel", "TokenDensityPatchModel", "CATPruningPatchModel")


def _node(host, node_id, model):
    cls = host.pack_nodes()[node_id]
    inputs = host.every_step_inputs(cls, start_percent=0.0) if node_id in comfy_host.EVERY_STEP else \
        host.node_inputs(cls, full_percent=0.3)
    return host.run_node(cls, model=model, **inputs)[0]


def _qwen_edit_2511(host):
    model = host.tiny_qwen_image(marker_keys=host.QWEN_EDIT_2511)
    if getattr(model.model.diffusion_model, "default_ref_method", None) != "index_timestep_zero":
        pytest.skip("this ComfyUI's Qwen-Image has no index_timestep_zero reference mode (Edit 2511)")
    return model, (1, 16, 1, 12, 10), {"reference_latents": [REF[:, :, None]]}


def _flux2_timestep_zero(host):
    try:
        model = host.tiny_flux2()
    except comfy_host.HostTooOld as e:
        pytest.skip(str(e))
    ref = torch.randn(1, 128, 6, 5, generator=torch.Generator().manual_seed(2))
    # guidance None: the host doubles the timestep for that mode but not the guidance (it fails unpatched)
    return model, (1, 128, 6, 5), {"reference_latents": [ref], "reference_latents_method": "index_timestep_zero",
                                   "guidance": None}


HIDDEN_RANGES = {"qwen_image_edit_2511": _qwen_edit_2511, "flux2_index_timestep_zero": _flux2_timestep_zero}


@pytest.mark.parametrize("node_id", METHODS)
@pytest.mark.parametrize("case", list(HIDDEN_RANGES))
def test_reference_modulation_inside_the_host_block_runs_unreduced_with_one_warning(host, case, node_id, caplog):
    model, shape, extra = HIDDEN_RANGES[case](host)
    kw = dict(latent=torch.zeros(shape), steps=4, cond_extra=extra)
    base = host.sample(model, **kw)
    patched = _node(host, node_id, model)
    host.load_pack()
    importlib.import_module(f"{host.PACK_NAME}.kernels.runtime")._warned.clear()
    with caplog.at_level(logging.WARNING, logger="token_reduction"):
        out = host.sample(patched, **kw)
        out_again = host.sample(patched, **kw)
    assert torch.equal(out, base) and torch.equal(out_again, base), "the unpatched model's result"
    warnings = [r.getMessage() for r in caplog.records if "not recognised" in r.getMessage()]
    assert len(warnings) == 1 and "modulation" in warnings[0], warnings
    # Without the reference mode the same model is reduced: the guard is the modulation, not the family.
    plain = dict(kw, cond_extra={})
    assert not torch.equal(host.sample(patched, **plain), host.sample(model, **plain))


def test_zimage_reference_ranges_follow_the_reduced_image(host):
    """Z-Image with a reference image: the layer gets timestep_zero_index = [image range, caption range]
    (the rest, the reference, at timestep zero). A reduced layer call gets the image range ending where its
    fewer image tokens end, and the caption range unchanged."""
    try:
        model = host.tiny_zimage()
    except comfy_host.HostTooOld as e:
        pytest.skip(str(e))
    host.load_pack()
    patching = importlib.import_module(f"{host.PACK_NAME}.nodes.patching")
    seen = []

    def spy(args, extra):
        seen.append((args["img"].shape[1], args.get("timestep_zero_index")))
        return extra["original_block"](args)

    info = patching.detect_family(model, "test")
    spied = model.clone()
    patching.set_block_replaces(spied, info.family, {spec.key: spy for spec in info.family.blocks})
    extra = {"reference_latents": [REF[:, :, :10, :14]]}
    kw = dict(latent=torch.zeros(1, 16, 10, 14), steps=4, cond_extra=extra)
    host.sample(spied, **kw)
    full = seen[0]
    if full[1] is None:
        pytest.skip("this ComfyUI's Z-Image passes no timestep_zero_index to its layers")
    seen.clear()
    patched = _node(host, "SDTMPatchModel", spied)
    out = host.sample(patched, **kw)
    assert torch.isfinite(out).all()
    length, (image, caption) = full[0], full[1]
    assert image[1] == length, "the image range ends the sequence"
    reduced = [(n, r) for n, r in seen if n < length]
    assert reduced, "some layer calls ran on fewer image tokens"
    for n, (img_range, cap_range) in reduced:
        assert tuple(img_range) == (image[0], n) and tuple(cap_range) == tuple(caption)

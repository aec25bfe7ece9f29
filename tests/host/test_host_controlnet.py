"""Host tests: ControlNet-style residuals through the pack's patched blocks.

Flux: the host's own ControlNetFlux (InstantX layout) adds a residual to the image tokens after every
double and single block; Wan: VACE blocks add theirs after the main blocks. Both add to what our block
replacements return, so they need full-density outputs at the image's place. For SDTM, CAT and the
density schedule at their node defaults:
- identity window (start_percent 1) with the control applied is bit-identical to the unpatched model
  with the control;
- the patched output is nearer the unpatched output with the same control than without it (and the
  uncontrolled patched output nearer the uncontrolled one);
- where the method's own error is well below the control's effect, the control steers the patched model
  as it steers the unpatched one: the change the control makes points the same way (cosine of the two
  changes) and has a similar size. CAT on the random-weight Wan misses that precondition: consecutive
  predictions of random weights are barely related, so its cached tokens move the output by ~0.4
  (relative), more than VACE's steering (~0.2).
"""
import pytest
import torch

from test_host_families import _rel

METHODS = ("SDTMPatchModel", "CATPruningPatchModel", "TokenDensityPatchModel")


def _flux_conds(control):
    gen = torch.Generator().manual_seed(11)
    conds = []
    for _ in range(2):
        extra = {"pooled_output": torch.randn(1, 32, generator=gen), "guidance": 3.5}
        if control is not None:
            extra["control"] = control
        conds.append([[torch.randn(1, 16, 32, generator=gen), extra]])
    return conds


def _wan_conds(vace: bool):
    gen = torch.Generator().manual_seed(11)
    frames = torch.randn(1, 32, 3, 10, 14, generator=gen) * 2.0
    conds = []
    for _ in range(2):
        extra = {}
        if vace:
            extra = {"vace_frames": [frames], "vace_mask": [torch.ones(1, 64, 3, 10, 14)], "vace_strength": [1.0]}
        conds.append([[torch.randn(1, 16, 32, generator=gen), extra]])
    return conds


def _sample(model, conds, latent, steps=6):
    import comfy.sample
    noise = comfy.sample.prepare_noise(latent, 3)
    return comfy.sample.sample(model, noise, steps, 3.0, "euler", "simple", conds[0], conds[1], latent,
                               disable_pbar=True, seed=3)


def _cosine(a, b):
    a, b = a.flatten(), b.flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _check(host, model, with_control, without_control, latent, method, direction=True):
    node = host.pack_nodes()[method]
    d = host.node_inputs(node)
    base_c = _sample(model, with_control, latent)
    base_n = _sample(model, without_control, latent)
    (identity,) = host.run_node(node, model=model, **{**d, "start_percent": 1.0})
    assert torch.equal(_sample(identity, with_control, latent), base_c)
    (patched,) = host.run_node(node, model=model, **d)
    out_c = _sample(patched, with_control, latent)
    out_n = _sample(patched, without_control, latent)
    assert torch.isfinite(out_c).all()
    steer_base, steer_patched = base_c - base_n, out_c - out_n
    assert steer_base.norm() > 0.1 * base_n.norm(), "the control must change the image for this test to mean much"
    assert _rel(out_c, base_c) < _rel(out_c, base_n) and _rel(out_n, base_n) < _rel(out_n, base_c)
    if direction:
        assert _rel(out_c, base_c) < 0.6, _rel(out_c, base_c)
        assert _cosine(steer_patched, steer_base) > 0.8, _cosine(steer_patched, steer_base)
        assert 0.6 < float(steer_patched.norm() / steer_base.norm()) < 1.6


@pytest.mark.parametrize("method", METHODS)
def test_flux_controlnet_through_patched_blocks(host, one_torch_thread, method):
    control = host.tiny_flux_controlnet()
    hint = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2)) * 2.0
    cnet = control.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
    model = host.tiny_flux(depth=2, depth_single=4)
    _check(host, model, _flux_conds(cnet), _flux_conds(None), torch.zeros(1, 16, 16, 16), method)


@pytest.mark.parametrize("method", METHODS)
def test_wan_vace_through_patched_blocks(host, one_torch_thread, method):
    model = host.tiny_wan_vace(layers=4)
    _check(host, model, _wan_conds(True), _wan_conds(False), torch.zeros(1, 16, 3, 10, 14), method,
           direction=method != "CATPruningPatchModel")

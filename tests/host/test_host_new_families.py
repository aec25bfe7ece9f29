"""Host tests of the families new in ComfyUI 0.3.75: Flux 2, Z-Image, HunyuanImage 2.1, HunyuanVideo 1.5.

Each runs SDTM, CAT and the density schedule through the host's own model classes. Families that a host
predates skip with that reason; every test skips, with the reason, without a ComfyUI checkout.
"""
import importlib
import math

import pytest
import torch

from tools import comfy_host

FAMILIES = {  # builder, latent
    "flux2": ("tiny_flux2", (1, 128, 8, 10)),
    "zimage": ("tiny_zimage", (1, 16, 10, 14)),          # 5 x 7 = 35 image tokens: padded to 64
    "hunyuan_image21": ("tiny_hunyuan_image21", (1, 64, 8, 6)),
    "hunyuan_video15": ("tiny_hunyuan_video15", (1, 32, 2, 6, 8)),
}
PATCH = {"flux2": 1, "zimage": 2, "hunyuan_image21": 1, "hunyuan_video15": 1}
METHODS = {"SDTMPatchModel": dict(start_percent=0.0), "CATPruningPatchModel": dict(full_percent=0.3),
           "TokenDensityPatchModel": dict(start_percent=0.0)}


def _build(host, family):
    try:
        return getattr(host, FAMILIES[family][0])()
    except comfy_host.HostTooOld as e:
        pytest.skip(str(e))


def _grid(family):
    shape, p = FAMILIES[family][1], PATCH[family]
    grid = tuple(math.ceil(s / p) for s in shape[2:])
    return (shape[2],) + grid[1:] if len(shape) == 5 else grid


def _node(host, node_id, model, **overrides):
    cls = host.pack_nodes()[node_id]
    return host.run_node(cls, model=model, **host.node_inputs(cls, **overrides))[0]


def _spans_seen(host, model):
    """The model patched with SDTM from the first step; records (image start, image tokens, tokens in the
    block, grid) of every block call the method ran."""
    host.load_pack()
    sdtm = importlib.import_module(f"{host.PACK_NAME}.kernels.sdtm")
    patching = importlib.import_module(f"{host.PACK_NAME}.nodes.patching")

    class Spy(sdtm.SDTM):
        def run_block(self, block):
            self.seen.add((block.span.img_start, block.span.n_img, block.args["img"].shape[1], block.call.grid))
            return super().run_block(block)

    spy = Spy(sdtm.SDTMConfig(start_percent=0.0, skip_first_blocks=0, skip_last_blocks=0))
    spy.seen = set()
    return patching.patch_model(model, spy, "sdtm", "test"), spy


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("node_id", list(METHODS))
def test_each_method_runs_and_stays_near_unpatched(host, family, node_id):
    model = _build(host, family)
    latent = torch.zeros(FAMILIES[family][1])
    base = host.sample(model, latent=latent, steps=4)
    identity = _node(host, node_id, model, start_percent=1.0)
    assert torch.equal(host.sample(identity, latent=latent, steps=4), base), "start_percent 1 is the unpatched model"
    out = host.sample(_node(host, node_id, model, **METHODS[node_id]), latent=latent, steps=4)
    assert torch.isfinite(out).all() and out.shape == base.shape
    assert not torch.equal(out, base), "the method did reduce tokens"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_only_the_latent_image_tokens_are_reduced(host, family):
    model = _build(host, family)
    patched, spy = _spans_seen(host, model)
    host.sample(patched, latent=torch.zeros(FAMILIES[family][1]), steps=3)
    grid = _grid(family)
    n_img = math.prod(grid)
    assert spy.seen and {(n, g) for _, n, _, g in spy.seen} == {(n_img, grid)}, spy.seen


def test_zimage_padding_is_never_taken_for_image(host):
    """Z-Image pads caption and image each to a multiple of 32: [caption 16 + 16 pad, image 35 + 29 pad].
    The image starts after the padded caption, and its own padding stays out of the merge."""
    model = _build(host, "zimage")
    patched, spy = _spans_seen(host, model)
    host.sample(patched, latent=torch.zeros(FAMILIES["zimage"][1]), steps=3, context_len=16)
    assert {(start, n, length) for start, n, length, _ in spy.seen} == {(32, 35, 32 + 64)}, spy.seen


def test_flux2_is_described_as_flux_with_its_own_patch(host):
    model = _build(host, "flux2")
    host.load_pack()
    registry = importlib.import_module(f"{host.PACK_NAME}.kernels.registry")
    info = registry.describe(model.get_model_object("diffusion_model"), "test")
    assert info.patch_size == 1 and info.family.num_blocks == 4

"""Host tests of the families new in ComfyUI 0.33, each a tiny model built by the host's own model detection.

Per family: the tokens the pack reduces are exactly the latent's (a changed latent is found in the block's
input at exactly the span the adapter reports), identity settings are bit-identical, and each method stays
near the unpatched output. Families the found host predates skip with that reason; every test skips, with
the reason, without a ComfyUI checkout.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import pytest
import torch

from tools import comfy_host

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Case:
    builder: str
    label: str                 # the registry entry detection must pick
    latent: tuple              # the sampled latent's shape
    grid: tuple                # its token grid
    sample: dict = field(default_factory=dict)  # comfy_host.sample keywords (conditioning widths)
    conds: tuple = ()          # (conditioning key, shape) of extra latents, random, the same every run
    flags: tuple = ()          # (conditioning key, value) of other conditioning


VIDEO = (1, 16, 3, 10, 14)     # 3 frames of 5 x 7 tokens at patch 2
CASES = {
    "chroma_radiance": Case("tiny_chroma_radiance", "Chroma Radiance", (1, 3, 64, 48), (8, 6)),
    "wan_animate": Case("tiny_wan_animate", "Wan Animate", VIDEO, (3, 5, 7), dict(ctx_dim=4096),
                        (("pose_video_latent", VIDEO),)),
    "wan_scail": Case("tiny_scail", "Wan SCAIL / SCAIL-2", VIDEO, (3, 5, 7), dict(ctx_dim=4096),
                      (("reference_latents", (1, 16, 1, 10, 14)), ("pose_video_latent", VIDEO))),
    # SCAIL-2 in replacement mode (its other rotary layout), with its identity masks
    "wan_scail2": Case("tiny_scail2", "Wan SCAIL / SCAIL-2", VIDEO, (3, 5, 7), dict(ctx_dim=4096),
                       (("reference_latents", (1, 16, 1, 10, 14)), ("pose_video_latent", VIDEO),
                        ("driving_mask_28ch", (1, 3, 28, 10, 14)), ("ref_mask_28ch", (1, 4, 28, 10, 14))),
                       (("ref_mask_flag", False),)),
}
METHODS = {"SDTMPatchModel": dict(start_percent=0.0), "CATPruningPatchModel": dict(full_percent=0.3),
           "TokenDensityPatchModel": dict(start_percent=0.0)}
REL_L2_BOUND = 0.4  # random weights: bounds on plumbing, not image quality


def build(host, family):
    try:
        return getattr(host, CASES[family].builder)()
    except comfy_host.HostTooOld as e:
        pytest.skip(str(e))


def sample_kwargs(family, steps=4, **extra):
    """The family's sampling keywords with its extra conditioning latents (seeded, the same every call)."""
    case = CASES[family]
    gen = torch.Generator().manual_seed(11)
    conds = {}
    for key, shape in case.conds:
        value = torch.randn(shape, generator=gen)
        conds[key] = [value] if key.endswith("latents") else value
    conds.update(case.flags)
    kw = dict(case.sample, latent=torch.zeros(case.latent), steps=steps, **extra)
    if conds:
        kw["cond_extra"] = conds
    return kw


def node(host, node_id, model, **overrides):
    cls = host.pack_nodes()[node_id]
    return host.run_node(cls, model=model, **host.node_inputs(cls, **overrides))[0]


def first_block_inputs(host, model, **sample_kw):
    """(image start, image tokens, the first block's img) of the first model call, as the pack saw it."""
    host.load_pack()
    sdtm = importlib.import_module(f"{host.PACK_NAME}.kernels.sdtm")
    patching = importlib.import_module(f"{host.PACK_NAME}.nodes.patching")
    seen = []

    class Spy(sdtm.SDTM):
        def run_block(self, block):
            if block.spec.index == 0:
                seen.append((block.span.img_start, block.span.n_img, block.args["img"].clone()))
            return super().run_block(block)

    spy = Spy(sdtm.SDTMConfig(start_percent=0.0, skip_first_blocks=0, skip_last_blocks=0))
    host.sample(patching.patch_model(model, spy, "sdtm", "test"), **sample_kw)
    assert seen, "the pack never located the image tokens of the first block"
    return seen[0]


@pytest.mark.parametrize("family", list(CASES))
def test_detection_picks_the_family(host, family):
    model = build(host, family)
    host.load_pack()
    registry = importlib.import_module(f"{host.PACK_NAME}.kernels.registry")
    entry = registry.entry_for(model.get_model_object("diffusion_model"))
    assert entry is not None and entry.label == CASES[family].label and not entry.refused


@pytest.mark.parametrize("family", list(CASES))
def test_exactly_the_latent_tokens_are_reduced(host, family):
    """Mark the latent: two runs that differ only in the latent differ in the first block's input at exactly
    the tokens the pack takes for the image (text, reference and pose tokens stay put)."""
    model = build(host, family)
    case = CASES[family]
    kw = sample_kwargs(family, steps=1, denoise=0.5)  # sigma < 1: the model's input carries the latent
    marked = torch.randn(case.latent, generator=torch.Generator().manual_seed(3))
    start, n_img, plain = first_block_inputs(host, model, **kw)
    start_m, n_img_m, changed = first_block_inputs(host, model, **{**kw, "latent": marked})
    assert (start, n_img) == (start_m, n_img_m) and n_img == math.prod(case.grid)
    moved = (plain != changed).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
    assert moved == list(range(start, start + n_img)), (start, n_img, moved)


@pytest.mark.parametrize("family", list(CASES))
@pytest.mark.parametrize("node_id", list(METHODS))
def test_identity_is_exact_and_each_method_stays_near_unpatched(host, family, node_id):
    model = build(host, family)
    kw = sample_kwargs(family)
    base = host.sample(model, **kw)
    identity = node(host, node_id, model, start_percent=1.0)
    assert torch.equal(host.sample(identity, **kw), base), "start_percent 1 is the unpatched model"
    out = host.sample(node(host, node_id, model, **METHODS[node_id]), **kw)
    assert torch.isfinite(out).all() and out.shape == base.shape
    assert not torch.equal(out, base), "the method reduced tokens"
    assert ((out - base).norm() / base.norm()).item() < REL_L2_BOUND


def test_every_diffusion_model_class_of_the_host_is_supported_or_refused_by_name(host):
    """A class the host adds fails here until the registry supports or refuses it, with its reason."""
    host.load_pack()
    registry = importlib.import_module(f"{host.PACK_NAME}.kernels.registry")
    found = host.diffusion_model_classes()
    assert len(found) > 20, found  # the reader found the host's classes
    unnamed = sorted(registry.class_path(cls) for cls in found if registry.entry_for_class(cls) is None)
    assert not unnamed, f"not in kernels/registry.py: {unnamed}"

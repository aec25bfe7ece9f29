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
    latent: tuple              # the sampled latent's shape; a tuple of shapes: video and audio (the first is marked)
    grid: tuple                # its token grid
    sample: dict = field(default_factory=dict)  # comfy_host.sample keywords (conditioning widths)
    conds: tuple = ()          # (conditioning key, shape) of extra latents, random, the same every run
    flags: tuple = ()          # (conditioning key, value) of other conditioning


VIDEO = (1, 16, 3, 10, 14)     # 3 frames of 5 x 7 tokens at patch 2
CASES = {
    "chroma_radiance": Case("tiny_chroma_radiance", "Chroma Radiance", (1, 3, 64, 48), (8, 6)),
    "wan_animate": Case("tiny_wan_animate", "Wan Animate", VIDEO, (3, 5, 7), {},
                        (("pose_video_latent", VIDEO),)),
    "wan_scail": Case("tiny_scail", "Wan SCAIL / SCAIL-2", VIDEO, (3, 5, 7), {},
                      (("reference_latents", (1, 16, 1, 10, 14)), ("pose_video_latent", VIDEO))),
    # SCAIL-2 in replacement mode (its other rotary layout), with its identity masks
    "wan_scail2": Case("tiny_scail2", "Wan SCAIL / SCAIL-2", VIDEO, (3, 5, 7), {},
                       (("reference_latents", (1, 16, 1, 10, 14)), ("pose_video_latent", VIDEO),
                        ("driving_mask_28ch", (1, 3, 28, 10, 14)), ("ref_mask_28ch", (1, 4, 28, 10, 14))),
                       (("ref_mask_flag", False),)),
    "zimage_pixel": Case("tiny_zimage_pixel", "Z-Image (pixel space)", (1, 3, 48, 56), (6, 7)),
    # Krea 2 takes Wan 2.1's latents, (B, 16, 1, H, W) for an image; its reference keeps a modulation of its own
    "krea2": Case("tiny_krea2", "Krea 2", (1, 16, 1, 12, 10), (1, 6, 5), dict(ctx_dim=64)),
    "krea2_reference": Case("tiny_krea2", "Krea 2", (1, 16, 1, 12, 10), (1, 6, 5), dict(ctx_dim=64),
                            (("reference_latents", (1, 16, 1, 8, 6)),),
                            (("reference_latents_method", "index_timestep_zero"),)),
    "kandinsky5": Case("tiny_kandinsky5", "Kandinsky 5", VIDEO, (3, 5, 7), dict(pooled_dim=32)),
    "kandinsky5_image": Case("tiny_kandinsky5", "Kandinsky 5", (1, 16, 10, 14), (5, 7), dict(pooled_dim=32)),
    "ltx2": Case("tiny_ltxav", "LTX-2", ((1, 128, 3, 4, 6), (1, 8, 10, 16)), (3, 4, 6), dict(ctx_dim=128)),
    "minimax_h3": Case("tiny_minimax_h3", "MiniMax H3", ((1, 24, 3, 10, 14), (1, 32, 2, 12)), (3, 5, 7),
                       dict(ctx_dim=64)),
}
METHODS = {"SDTMPatchModel": dict(start_percent=0.0), "CATPruningPatchModel": dict(full_percent=0.3),
           "TokenDensityPatchModel": dict(start_percent=0.0)}


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
    kw = dict(case.sample, latent=latent(case, torch.zeros), steps=steps, **extra)
    if conds:
        kw["cond_extra"] = conds
    return kw


def latent(case, make):
    """The case's latent from `make(shape)`: a tensor, or video and audio in the host's NestedTensor (only the
    video from `make`, the audio zeros)."""
    if not isinstance(case.latent[0], tuple):
        return make(case.latent)
    import comfy.nested_tensor
    video, *others = case.latent
    return comfy.nested_tensor.NestedTensor([make(video)] + [torch.zeros(s) for s in others])


def streams(x):
    return x.unbind() if getattr(x, "is_nested", False) else [x]


def node(host, node_id, model, **overrides):
    cls = host.pack_nodes()[node_id]
    return host.run_node(cls, model=model, **host.node_inputs(cls, **overrides))[0]


def first_block_inputs(host, model, **sample_kw):
    """(image start, image tokens, the first block's img) of the first model call whose first block the pack
    offered the method (Flux-like families read the text order from a call, so from the second on)."""
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
    the tokens the pack takes for the image (text, reference and pose tokens stay put; Z-Image's refiner
    layers mix its image padding, which follows the image, with the image)."""
    model = build(host, family)
    case = CASES[family]
    host.load_pack()
    registry = importlib.import_module(f"{host.PACK_NAME}.kernels.registry")
    family_of = registry.describe(model.get_model_object("diffusion_model"), "test").family
    pad = (-math.prod(case.grid)) % family_of.pad_multiple if family_of.pad_multiple else 0
    kw = sample_kwargs(family, steps=2, denoise=0.5)  # sigma < 1: the model's input carries the latent
    gen = torch.Generator().manual_seed(3)
    marked = latent(case, lambda shape: torch.randn(shape, generator=gen))
    start, n_img, plain = first_block_inputs(host, model, **kw)
    start_m, n_img_m, changed = first_block_inputs(host, model, **{**kw, "latent": marked})
    assert (start, n_img) == (start_m, n_img_m) and n_img == math.prod(case.grid)
    moved = (plain != changed).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
    assert moved == list(range(start, start + n_img + pad)), (start, n_img, moved)


@pytest.mark.parametrize("family", list(CASES))
@pytest.mark.parametrize("node_id", list(METHODS))
def test_identity_is_exact_and_each_method_stays_near_unpatched(host, family, node_id):
    """Near: closer to the unpatched result than the unpatched result of another seed is (random weights make
    any fixed bound arbitrary)."""
    model = build(host, family)
    kw = sample_kwargs(family)
    base = streams(host.sample(model, **kw))
    other_seed = streams(host.sample(model, seed=1, **kw))[0]
    identity = node(host, node_id, model, start_percent=1.0)
    assert all(torch.equal(a, b) for a, b in zip(streams(host.sample(identity, **kw)), base)), \
        "start_percent 1 is the unpatched model"
    out = streams(host.sample(node(host, node_id, model, **METHODS[node_id]), **kw))
    assert len(out) == len(base) and all(torch.isfinite(o).all() and o.shape == b.shape for o, b in zip(out, base))
    assert not torch.equal(out[0], base[0]), "the method reduced tokens"
    assert (out[0] - base[0]).norm() < (other_seed - base[0]).norm()


def test_every_diffusion_model_class_of_the_host_is_supported_or_refused_by_name(host):
    """A class the host adds fails here until the registry supports or refuses it, with its reason."""
    host.load_pack()
    registry = importlib.import_module(f"{host.PACK_NAME}.kernels.registry")
    found = host.diffusion_model_classes()
    assert len(found) > 20, found  # the reader found the host's classes
    unnamed = sorted(registry.class_path(cls) for cls in found if registry.entry_for_class(cls) is None)
    assert not unnamed, f"not in kernels/registry.py: {unnamed}"


def test_ltx2_reduced_video_tokens_keep_their_own_timesteps_and_rotary_entries(host):
    """LTX-2 keeps its video timesteps per frame (CompressedTimestep) or per token; a reduced call takes each
    kept token's own entry, as the host's expanded tables hold it."""
    try:
        from comfy.ldm.lightricks.av_model import CompressedTimestep
    except ImportError as e:
        pytest.skip(f"LTX-2 needs a newer ComfyUI ({e})")
    host.load_pack()
    families = importlib.import_module(f"{host.PACK_NAME}.kernels.families")
    token_ops = importlib.import_module(f"{host.PACK_NAME}.kernels.token_ops")
    gen = torch.Generator().manual_seed(0)
    frames, per_frame, batch = 3, 8, 2
    per_token = torch.randn(batch, frames, 1, 12, generator=gen).expand(-1, -1, per_frame, -1).reshape(batch, -1, 12)
    index = torch.stack([torch.randperm(frames * per_frame, generator=gen)[:10] for _ in range(batch)])
    for timestep in (CompressedTimestep(per_token, per_frame), CompressedTimestep(per_token, None)):
        taken = families._tokens_at(timestep, index)
        assert torch.equal(taken, token_ops.take_rows(timestep.expand(), index, 1))
    rotary = (torch.randn(1, frames * per_frame, 2, 4, 2, 2, generator=gen), True)
    taken = families._tokens_at(rotary, index)
    assert taken[1] is True and torch.equal(taken[0], rotary[0].expand(batch, -1, -1, -1, -1, -1)[
        torch.arange(batch)[:, None], index])

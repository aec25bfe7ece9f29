"""kernels/registry.py: which host models the pack patches, told apart without importing the host."""
import types

import pytest

from kernels import registry
from kernels.registry import UnsupportedModelError, describe


def host_class(path: str, base=object, **attrs):
    module, name = path.rsplit(".", 1)
    return type(name, (base,), {"__module__": module, **attrs})


def flux(**params):
    cls = host_class("comfy.ldm.flux.model.Flux")
    dm = cls()
    dm.double_blocks, dm.single_blocks, dm.patch_size = [0] * 2, [0] * 3, 2
    dm.params = types.SimpleNamespace(**params)
    return dm


def test_products_sharing_a_class_are_told_apart():
    assert registry.entry_for(flux()).label.startswith("Flux (")
    assert registry.entry_for(flux(global_modulation=True)).label == "Flux 2"
    info = describe(flux(), "SDTM Token Merging")
    assert info.patch_size == 2 and info.family.num_blocks == 5


def test_sd3_matches_through_its_subclass():
    mmdit = host_class("comfy.ldm.modules.diffusionmodules.mmdit.MMDiT")
    wrapper = host_class("comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper", mmdit)
    dm = wrapper()
    dm.joint_blocks, dm.patch_size = [0] * 4, 2
    assert describe(dm, "test").family.name == "SD3"


def test_subclasses_of_exact_classes_are_refused():
    """A pixel-space Flux variant lays out tokens differently: only Flux itself is Flux."""
    dm = host_class("some.pack.PixelFlux", type(flux()))()
    with pytest.raises(UnsupportedModelError, match="its diffusion model is PixelFlux"):
        describe(dm, "SDTM Token Merging")


def test_refusals_name_the_family_the_reason_and_what_is_supported():
    dm = host_class("comfy.ldm.pixart.pixartms.PixArtMS")()
    with pytest.raises(UnsupportedModelError) as e:
        describe(dm, "CAT Cached Token Pruning", "PixArt")
    message = str(e.value)
    assert message.startswith("CAT Cached Token Pruning cannot patch this model: its diffusion model is PixArtMS "
                              "(model type PixArt): PixArt: ")
    assert message.endswith(f"Supported families: {registry.SUPPORTED_TEXT}.")


def test_a_temporal_patch_is_refused_with_the_family_named():
    dm = host_class("comfy.ldm.wan.model.WanModel")()
    dm.blocks, dm.patch_size = [0] * 2, (2, 2, 2)
    with pytest.raises(UnsupportedModelError, match="SDTM: Wan 2.1 / 2.2 .* with temporal patch size 2"):
        describe(dm, "SDTM")


def test_every_supported_entry_names_an_example_workflow():
    from tools.comfy_host import PACK_ROOT
    for e in registry.SUPPORTED:
        assert (PACK_ROOT / "workflows" / e.workflow).is_file(), f"{e.label}: no workflows/{e.workflow}"

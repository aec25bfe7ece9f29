"""Proportional attention two ways (kernels/attention.py): an additive key bias log(s) (key_bias_hook), and the
group size carried in an extra value channel with no mask (size_weighted_hook), which leaves the host's
fastest attention kernel eligible. They must agree to float32 rounding."""
from __future__ import annotations

import pytest
import torch

from kernels.attention import key_bias_hook, override_attention, size_weighted_hook
from kernels.density import DensityConfig, DensitySchedule
from kernels.families import image_span
from kernels.block_runners import run_block_merged
from kernels.sdtm import SDTM, SDTMConfig
from tools import reference_dit as R

B, H, D, N_TXT, M = 2, 3, 20, 5, 7


def _qkv(skip_reshape: bool, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
    if not skip_reshape:
        q, k, v = (t.transpose(1, 2).reshape(B, n, H * D) for t in (q, k, v))
    return q, k, v


def _sizes(seed: int = 1):
    return torch.randint(1, 5, (B, M), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("skip_reshape", [True, False])
@pytest.mark.parametrize("skip_output_reshape", [True, False])
@pytest.mark.parametrize("joint", [True, False], ids=["joint", "image-only"])
def test_value_channel_equals_the_key_bias(skip_reshape, skip_output_reshape, joint):
    n = N_TXT + M if joint else M
    q, k, v = _qkv(skip_reshape, n)
    sizes = _sizes()
    seen = {}

    def sdpa(*args, **kwargs):
        seen[len(seen)] = (args[1].shape, args[2].shape, kwargs.get("mask"))
        return R.attention_sdpa(*args, **kwargs)

    outs = []
    for hook in (key_bias_hook(sizes.log(), N_TXT, M), size_weighted_hook(sizes, N_TXT, M)):
        to = override_attention({R.ATTENTION_OVERRIDE_KEY: lambda f, *a, **kw: sdpa(*a, **kw)}, hook)
        outs.append(R.attention_sdpa(q, k, v, H, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                                     transformer_options=to))
    assert outs[0].shape == outs[1].shape
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    (_, _, mask_bias), (k_free, v_free, mask_free) = seen[0], seen[1]
    assert mask_bias is not None and mask_free is None, "the value-channel form passes no mask"
    padded = (k_free[-1] if skip_reshape else k_free[-1] // H)
    assert padded % 8 == 0 and padded > D and v_free == k_free, "q, k, v padded alike to a multiple of 8"


def test_values_with_split_heads_and_heads_by_keyword():
    """SD3's joint attention: q and k (B, L, H*D), v (B, L, H, D), heads passed as a keyword."""
    q, k, v = _qkv(False, N_TXT + M)
    v = v.unflatten(-1, (H, D))
    sizes = _sizes()
    outs = [R.attention_sdpa(q, k, v, heads=H, transformer_options=override_attention({}, h))
            for h in (key_bias_hook(sizes.log(), N_TXT, M), size_weighted_hook(sizes, N_TXT, M))]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_a_host_mask_passes_through_the_value_channel_form():
    q, k, v = _qkv(True, N_TXT + M)
    sizes = _sizes()
    mask = torch.ones(N_TXT + M, N_TXT + M, dtype=torch.bool)
    mask[:, 1] = False  # the host masks one text key
    outs = [R.attention_sdpa(q, k, v, H, mask=mask, skip_reshape=True, transformer_options=override_attention({}, h))
            for h in (key_bias_hook(sizes.log(), N_TXT, M), size_weighted_hook(sizes, N_TXT, M))]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model(one_torch_thread):
    return R.ReferenceDiT(R.DiTConfig(image_size=32)).init_weights(0).eval()


@pytest.mark.parametrize("kind", ["double", "single"])
def test_merged_block_is_the_same_either_way(model, kind):
    gen = torch.Generator().manual_seed(3)
    c, n_side = model.config, 8
    n_img = n_side * n_side
    img, txt = torch.randn(2, n_img, c.hidden, generator=gen), torch.randn(2, c.txt_len, c.hidden, generator=gen)
    vec = torch.randn(2, c.hidden, generator=gen)
    ids = torch.zeros(2, c.txt_len + n_img, 3)
    ids[:, c.txt_len:, 1] = (torch.arange(n_img) // n_side).float()
    ids[:, c.txt_len:, 2] = (torch.arange(n_img) % n_side).float()
    pe = model.pe_embedder(ids)
    family = model.family()
    if kind == "double":
        blk, spec = model.double_blocks[0], family.blocks[0]
        args = {"img": img, "txt": txt, "vec": vec, "pe": pe, "transformer_options": {}}

        def original(a):
            i, t = blk(a["img"], a["txt"], a["vec"], a["pe"], transformer_options=a["transformer_options"])
            return {"img": i, "txt": t}
    else:
        blk, spec = model.single_blocks[0], family.blocks[c.depth_double]
        args = {"img": torch.cat([txt, img], 1), "vec": vec, "pe": pe, "transformer_options": {}}

        def original(a):
            return {"img": blk(a["img"], a["vec"], a["pe"], transformer_options=a["transformer_options"])}
    span = image_span(spec, args, n_img, c.txt_len, family)
    plan = SDTM(SDTMConfig(ratio=0.6, ratio_adjust=False, start_percent=0.0)).plan(
        args["img"][:, span.img_start:span.img_start + n_img], (n_side, n_side), 1, 6, 0.5)
    assert float(plan.sizes.max()) > 1
    biased = run_block_merged(args, original, plan, span, family, key_bias=plan.sizes.log())
    free = run_block_merged(args, original, plan, span, family, key_weights=plan.sizes)
    for key in biased:
        torch.testing.assert_close(free[key], biased[key], rtol=1e-5, atol=1e-5)
    plain = run_block_merged(args, original, plan, span, family)
    assert not torch.allclose(plain["img"], biased["img"], atol=1e-4), "the weighting changes the block"


def test_a_density_run_is_the_same_either_way(model):
    """The density plan does not depend on the tokens, so a whole run can be compared."""
    runs = [R.sample(model, [1, 2], steps=6, transformer_options=R.method_options(
        DensitySchedule(DensityConfig(start_percent=0.0), bias_free_attention=free), model, "density"))
        for free in (False, True)]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)

"""Host tests: the SDTM patch next to the companions users stack it with (issue: every family and
companion). LoRA applied before or after the node, ComfyUI's EasyCache before or after the node,
batch sizes 1-4, img2img (denoise < 1) and bf16 / fp16, on tiny Flux and Wan models of the host's classes.

Every test takes the `host` fixture and skips, with the reason, without a ComfyUI checkout.
"""
import pytest
import torch

from test_host_sdtm import count_flops, rel_l2

FAMILIES = ["flux", "wan"]
SDTM = dict(preset="custom", ratio=0.5, deviation=0.2, switch_percent=0.4, window=2, skip_first_blocks=0, skip_last_blocks=0,
            dynamic_merge=True, ratio_adjust=True, prompt_reweight=True, start_percent=0.0, end_percent=1.0,
            detail_cache=False)  # merging at every step: what stacking and precision must not break


def _model(host, family, dtype=None):
    return host.tiny_flux(dtype=dtype) if family == "flux" else host.tiny_wan(dtype=dtype)


def _latent(family, batch=1):
    return torch.zeros(batch, 16, 16, 16) if family == "flux" else torch.zeros(batch, 16, 2, 12, 12)


def _sdtm(host, model, **kw):
    (out,) = host.run_node(host.pack_nodes()["SDTMPatchModel"], model=model, **{**SDTM, **kw})
    return out


def _lora(model, seed=11, scale=0.05):
    """A clone with a weight-diff patch (what a LoRA loader adds) on every 2-D block weight."""
    lora = model.clone()
    gen = torch.Generator().manual_seed(seed)
    sd = lora.model_state_dict()
    patches = {k: (torch.randn(v.shape, generator=gen) * scale,) for k, v in sorted(sd.items())
               if k.endswith(".weight") and v.ndim == 2 and "blocks." in k}
    assert lora.add_patches(patches, 1.0), "no LoRA key matched the model"
    return lora


def _easycache(model, threshold):
    from comfy_extras.nodes_easycache import EasyCacheNode
    (out,) = EasyCacheNode.execute(model, reuse_threshold=threshold, start_percent=0.0, end_percent=1.0,
                                   verbose=False).args
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_before_or_after_the_node_gives_the_same_image(host, family):
    model = _model(host, family)
    latent = _latent(family)
    before = host.sample(_sdtm(host, _lora(model)), latent=latent)
    after = host.sample(_lora(_sdtm(host, model)), latent=latent)
    plain = host.sample(_sdtm(host, model), latent=latent)
    assert torch.equal(before, after)
    assert rel_l2(plain, before) > 1e-3, "the LoRA had no effect: the test would not see a lost patch"


@pytest.mark.parametrize("family", FAMILIES)
def test_easycache_stacks_before_or_after_and_the_savings_multiply(host, family):
    """EasyCache skips whole steps (a DIFFUSION_MODEL wrapper); SDTM makes the steps that run cheaper.
    The order of the two nodes does not matter, and the stack costs less than either alone."""
    model = _model(host, family)
    kw = dict(latent=_latent(family), steps=10)
    stack_a = _easycache(_sdtm(host, model), 0.5)
    stack_b = _sdtm(host, _easycache(model, 0.5))
    assert torch.equal(host.sample(stack_a, **kw), host.sample(stack_b, **kw))
    _, base = count_flops(host, model, **kw)
    _, sdtm = count_flops(host, _sdtm(host, model), **kw)
    _, cache = count_flops(host, _easycache(model, 0.5), **kw)
    _, stack = count_flops(host, stack_a, **kw)
    assert cache < base, "EasyCache skipped no step: raise the threshold so the test sees stacking"
    assert stack < min(sdtm, cache)
    # Multiplying: the stack saves at least 80% of what the product of the two savings predicts.
    predicted = sdtm * cache / base
    assert stack < base - 0.8 * (base - predicted), (base, sdtm, cache, stack, predicted)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_do_not_depend_on_their_neighbours(host, family):
    """Batch 1 to 4: the first row of a batch sees the same noise as a batch of one, and gets the
    same image, because merge positions are shared by every row but decided per row content."""
    patched = _sdtm(host, _model(host, family))
    single = host.sample(patched, latent=_latent(family, 1))
    for batch in (2, 4):
        rows = host.sample(patched, latent=_latent(family, batch))
        assert rows.shape[0] == batch and torch.isfinite(rows).all()
        assert torch.allclose(rows[:1], single, rtol=1e-4, atol=1e-4), (batch, (rows[:1] - single).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_img2img_denoise_below_one(host, family):
    """denoise 0.6 starts at a lower sigma: progress is read from sigma, so the run starts in the
    detail stage; the identity window stays exact and the patched run stays close."""
    model = _model(host, family)
    gen = torch.Generator().manual_seed(3)
    latent = torch.randn(_latent(family).shape, generator=gen)
    base = host.sample(model, latent=latent, denoise=0.6)
    assert torch.equal(host.sample(_sdtm(host, model, start_percent=1.0), latent=latent, denoise=0.6), base)
    out = host.sample(_sdtm(host, model), latent=latent, denoise=0.6)
    assert 1e-4 < rel_l2(base, out) < 0.40


def test_torch_compile_wrapper_runs_the_patched_model(host):
    """ComfyUI's TorchCompileModel path (comfy_api.torch_helpers.set_torch_compile_wrapper) compiles
    the diffusion model; the pack's block replaces run inside the compiled forward. The 'eager'
    dynamo backend traces exactly what inductor would trace, without the C++ build, so the test
    checks tracing (graph breaks allowed) and equality, not kernel speed."""
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    torch._dynamo.reset()
    patched = _sdtm(host, host.tiny_flux())
    expected = host.sample(patched, latent=_latent("flux"), steps=2)
    compiled = patched.clone()
    set_torch_compile_wrapper(compiled, backend="eager")
    out = host.sample(compiled, latent=_latent("flux"), steps=2)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4), (out - expected).abs().max()
    torch._dynamo.reset()


@pytest.mark.parametrize("family", FAMILIES)
def test_inpainting_mask_keeps_the_unmasked_latent(host, family):
    """Inpainting (a noise mask): ComfyUI blends the known latent back outside the mask at every
    step. With the patch, the unmasked half is still the input latent, the identity window is
    exact, and the repainted half stays close to the unpatched repaint."""
    model = _model(host, family)
    latent = torch.randn(_latent(family).shape, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 1, *latent.shape[-2:])
    mask[..., :, : latent.shape[-1] // 2] = 1.0  # repaint the left half
    base = host.sample(model, latent=latent, noise_mask=mask)
    assert torch.equal(host.sample(_sdtm(host, model, start_percent=1.0), latent=latent, noise_mask=mask), base)
    out = host.sample(_sdtm(host, model), latent=latent, noise_mask=mask)
    keep = (slice(None),) * (latent.ndim - 1) + (slice(latent.shape[-1] // 2, None),)
    assert torch.allclose(out[keep], latent[keep], atol=1e-4), (out[keep] - latent[keep]).abs().max()
    left = (slice(None),) * (latent.ndim - 1) + (slice(None, latent.shape[-1] // 2),)
    assert 1e-4 < rel_l2(base[left], out[left]) < 0.45


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision(host, family, dtype):
    model = _model(host, family, dtype=dtype)
    latent = _latent(family)
    base = host.sample(model, latent=latent)
    out = host.sample(_sdtm(host, model), latent=latent)
    assert torch.isfinite(base).all() and torch.isfinite(out).all()
    assert 1e-3 < rel_l2(base, out) < 0.45

"""Host tests of token layouts: reference-image tokens (Flux Kontext), Chroma, and CFG batching.

Every test takes the `host` fixture and skips, with the reason, without a ComfyUI checkout.
"""
import importlib

import torch

from tools import comfy_host as host_mod

LATENT = (16, 16)  # latent 16x16 -> Flux token grid 8x8 = 64 image tokens


def _patched_with_spy(host, model):
    """The model patched with the pack's SDTM, recording the token count and grid of every plan request."""
    host.load_pack()
    patching = importlib.import_module(f"{host_mod.PACK_NAME}.nodes.patching")
    sdtm = importlib.import_module(f"{host_mod.PACK_NAME}.kernels.sdtm")

    class SpySDTM(sdtm.SDTM):
        def plan(self, metric, grid, block, num_blocks, progress):
            self.seen.append((metric.shape[1], tuple(grid)))
            return super().plan(metric, grid, block, num_blocks, progress)

    spy = SpySDTM(sdtm.SDTMConfig(skip_first_blocks=0, skip_last_blocks=0))
    spy.seen = []
    patched = model.clone()
    patching.install(patched, spy, "sdtm", patching.detect_family(model, "test"))
    return patched, spy


def _conds(ref_latent=None):
    gen = torch.Generator().manual_seed(7)
    extra = {} if ref_latent is None else {"reference_latents": [ref_latent]}
    pos = [[torch.randn(1, 16, 32, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen), **extra}]]
    neg = [[torch.randn(1, 16, 32, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen), **extra}]]
    return pos, neg


def _sample(model, pos, neg, steps=4):
    import comfy.sample
    latent = torch.zeros(1, 16, *LATENT)
    noise = comfy.sample.prepare_noise(latent, 3)
    return comfy.sample.sample(model, noise, steps, 3.0, "euler", "simple", pos, neg, latent,
                               disable_pbar=True, seed=3)


def test_kontext_reference_tokens_are_never_merged(host):
    """Reference-image tokens follow the latent's tokens in Flux's sequence; only the latent's merge."""
    model = host.tiny_flux()
    ref = torch.randn(1, 16, 12, 20, generator=torch.Generator().manual_seed(1))  # a different shape on purpose
    pos, neg = _conds(ref)
    baseline = _sample(model, pos, neg)
    patched, spy = _patched_with_spy(host, model)
    out = _sample(patched, pos, neg)
    n_img = (LATENT[0] // 2) * (LATENT[1] // 2)
    assert spy.seen, "the method was never asked for a plan"
    assert {s for s in spy.seen} == {(n_img, (LATENT[0] // 2, LATENT[1] // 2))}
    assert torch.isfinite(out).all() and out.shape == baseline.shape
    assert not torch.equal(out, baseline)


def test_cfg_batched_and_separate_calls_agree(host, monkeypatch):
    """Merge positions are shared by every batch row, so a row's result does not depend on whether
    ComfyUI batches cond and uncond into one call (plenty of free memory) or calls them one by one."""
    import comfy.model_management
    model = host.tiny_flux()
    patched, spy = _patched_with_spy(host, model)
    pos, neg = _conds()
    batch_sizes = []
    real = patched.model.diffusion_model.forward

    def counting_forward(x, *a, **k):
        batch_sizes.append(x.shape[0])
        return real(x, *a, **k)

    monkeypatch.setattr(patched.model.diffusion_model, "forward", counting_forward)
    batched = _sample(patched, pos, neg)
    assert set(batch_sizes) == {2}, f"expected cond+uncond batched together, saw batch sizes {batch_sizes}"
    batch_sizes.clear()
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 1)  # forces one call each
    separate = _sample(patched, pos, neg)
    assert set(batch_sizes) == {1}, f"expected separate cond/uncond calls, saw batch sizes {batch_sizes}"
    # Batched and unbatched matmuls may round differently; merging itself must not add a difference.
    assert torch.allclose(batched, separate, rtol=1e-4, atol=1e-4), (batched - separate).abs().max()


def test_chroma_shares_the_flux_adapter(host):
    """Chroma (Flux blocks, distilled modulation) is patched, merges only image tokens, keeps the
    identity window exact, and stays about as close to unpatched as tiny Flux does.
    Measured relative L2 at defaults (random weights, 128 px, 6 steps): 0.22; bound 0.40 as for Flux."""
    model = host.tiny_chroma()
    baseline = host.sample(model, height=128, width=128)
    nodes = host.pack_nodes()
    kw = dict(preset="custom", ratio=0.5, deviation=0.2, switch_percent=0.4, window=2, skip_first_blocks=0, skip_last_blocks=0,
              dynamic_merge=True, ratio_adjust=True, prompt_reweight=True, start_percent=0.0, end_percent=1.0)
    (identity,) = host.run_node(nodes["SDTMPatchModel"], model=model, **{**kw, "start_percent": 1.0})
    assert torch.equal(host.sample(identity, height=128, width=128), baseline)
    patched, spy = _patched_with_spy(host, model)
    out = host.sample(patched, height=128, width=128)
    assert spy.seen and {s for s in spy.seen} == {(64, (8, 8))}
    rel = ((out - baseline).norm() / baseline.norm()).item()
    assert 1e-3 < rel < 0.40, rel

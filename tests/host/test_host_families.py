"""Host tests of the Wan and Qwen-Image adapters: SDTM through ComfyUI's own model classes.

Every test takes the `host` fixture and skips, with the reason, without a ComfyUI checkout.
"""
import logging

import pytest
import torch

from test_host_layouts import _patched_with_spy
from test_host_sdtm import SUMMARY, assert_same_snapshot, snapshot

SDTM_DEFAULTS = dict(preset="custom", ratio=0.5, deviation=0.2, switch_percent=0.4, window=2, skip_first_blocks=0,
                     skip_last_blocks=0, dynamic_merge=True, ratio_adjust=True, prompt_reweight=True,
                     start_percent=0.0, end_percent=1.0)


LUMINA_COND = {"cond_extra": {"attention_mask": torch.ones(1, 16, dtype=torch.long)}}  # caption length 16


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


def test_density_schedule_on_wan_qwen_image_hunyuan_video_and_lumina(host):
    """The density node pools per latent frame on the (T, H, W) grids of Wan and HunyuanVideo, on
    Qwen-Image's (1, H, W) grid and on Lumina 2's (H, W) grid: identity window exact, output finite and near unpatched, input MODEL untouched."""
    node = host.pack_nodes()["TokenDensityPatchModel"]
    d = host.node_inputs(node)
    for model, latent, extra in ((host.tiny_wan(layers=4), torch.zeros(1, 16, 2, 10, 14), {}),
                                 (host.tiny_qwen_image(layers=4), torch.zeros(1, 16, 1, 16, 12), {}),
                                 (host.tiny_hunyuan_video(), torch.zeros(1, 16, 2, 10, 14), {}),
                                 (host.tiny_lumina2(), torch.zeros(1, 16, 16, 12), LUMINA_COND)):
        base = host.sample(model, latent=latent, **extra)
        before = snapshot(model)
        (identity,) = host.run_node(node, model=model, **{**d, "start_percent": 1.0})
        assert torch.equal(host.sample(identity, latent=latent, **extra), base)
        (patched,) = host.run_node(node, model=model, **d)
        out = host.sample(patched, latent=latent, **extra)
        assert_same_snapshot(before, snapshot(model))
        assert torch.isfinite(out).all()
        assert 1e-3 < _rel(out, base) < 0.45, _rel(out, base)


def test_cat_on_wan_qwen_image_hunyuan_video_and_lumina(host, monkeypatch, caplog):
    """CAT on Wan, Qwen-Image, HunyuanVideo (image before text) and Lumina 2 (no block hook): identity window
    exact, only a fraction of the tokens computed in pruned steps, output finite and near unpatched, input MODEL untouched, and
    cond/uncond batched or called one by one agree (the cache is per conditioning and row)."""
    import comfy.model_management
    node = host.pack_nodes()["CATPruningPatchModel"]
    d = host.node_inputs(node)
    for model, latent, extra in ((host.tiny_wan(layers=3), torch.zeros(1, 16, 3, 10, 14), {}),
                                 (host.tiny_qwen_image(layers=3), torch.zeros(1, 16, 1, 16, 12), {}),
                                 (host.tiny_hunyuan_video(), torch.zeros(1, 16, 3, 10, 14), {}),
                                 (host.tiny_lumina2(), torch.zeros(1, 16, 16, 12), LUMINA_COND)):
        kw = dict(latent=latent, steps=8, **extra)
        base = host.sample(model, **kw)
        before = snapshot(model)
        (identity,) = host.run_node(node, model=model, **{**d, "start_percent": 1.0})
        assert torch.equal(host.sample(identity, **kw), base)
        (patched,) = host.run_node(node, model=model, **d)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="token_reduction"):
            out = host.sample(patched, **kw)
        found = [m for m in (SUMMARY.search(r.getMessage()) for r in caplog.records) if m]
        assert len(found) == 1 and 40.0 < float(found[0]["computed"]) < 90.0, [r.getMessage() for r in caplog.records]
        assert_same_snapshot(before, snapshot(model))
        assert torch.isfinite(out).all()
        assert 1e-3 < _rel(out, base) < 0.6, _rel(out, base)
        with monkeypatch.context() as m:
            m.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 1)
            separate = host.sample(patched, **kw)
        assert torch.allclose(out, separate, rtol=1e-4, atol=1e-4), (out - separate).abs().max()


# ---- HunyuanVideo: image before text, a per-key text mask ------------------------------------------------

def test_hunyuan_video_merges_on_the_frame_grid(host):
    """HunyuanVideo: a 3-frame latent with an odd spatial grid (5x7 tokens) merges on the (T, H, W) grid;
    the text (after the image in the joint sequence) stays whole. Measured rel L2 at defaults: about 0.07."""
    model = host.tiny_hunyuan_video()
    latent = torch.zeros(1, 16, 3, 10, 14)
    _check_family(host, model, latent, (3, 5, 7), bound=0.40)


def _hunyuan_text_first(host, model) -> bool:
    """Whether this host puts HunyuanVideo's text before the image, as the pack reads it from a call
    (tests/host/test_host_image_tokens.py checks that reading against the host's own layout)."""
    import importlib
    host.load_pack()
    runtime = importlib.import_module(f"{host.PACK_NAME}.kernels.runtime")
    patching = importlib.import_module(f"{host.PACK_NAME}.nodes.patching")
    orders = set()

    class Recorder(runtime.TokenMethod):
        name = "order recorder"

        def run_block(self, block):
            orders.add(block.span.text_first)
            return block.original(block.args)

    patched = patching.patch_model(model, Recorder(), "order_recorder", "test")
    host.sample(patched, latent=torch.zeros(1, 16, 1, 4, 4), steps=2, cfg=1.0)
    (text_first,) = orders
    return text_first


def _hunyuan_block_args(dm, n_ref: int, n_img: int, n_txt: int, single: bool, text_first: bool, seed: int = 0):
    """Block arguments laid out as this host does: the image stream [reference, image], the text before or
    after it (`text_first`) in the rotary table and, for a single block, in the sequence."""
    gen = torch.Generator().manual_seed(seed)
    c = dm.hidden_size
    img = torch.randn(2, n_ref + n_img, c, generator=gen)
    txt = torch.randn(2, n_txt, c, generator=gen)
    img_ids = torch.zeros(1, n_ref + n_img, 3)
    img_ids[0, :, 1] = torch.arange(n_ref + n_img) // 7
    img_ids[0, :, 2] = torch.arange(n_ref + n_img) % 7
    txt_ids = torch.zeros(1, n_txt, 3)
    pe = dm.pe_embedder(torch.cat([txt_ids, img_ids] if text_first else [img_ids, txt_ids], 1))
    vec = torch.randn(2, c, generator=gen)
    if single:
        return {"img": torch.cat([txt, img] if text_first else [img, txt], 1), "vec": vec, "pe": pe,
                "attention_mask": None, "modulation_dims": None, "transformer_options": {}}
    return {"img": img, "txt": txt, "vec": vec, "pe": pe, "attention_mask": None, "modulation_dims_img": None,
            "modulation_dims_txt": None, "transformer_options": {}}


def _text_positions(n_ref: int, n_img: int, n_txt: int, text_first: bool) -> slice:
    """Where the text keys sit in the joint sequence."""
    return slice(0, n_txt) if text_first else slice(n_ref + n_img, n_ref + n_img + n_txt)


def test_hunyuan_video_text_mask_follows_merged_keys(host, one_torch_thread):
    """HunyuanVideo masks padded text keys with args["attention_mask"] over the joint sequence (the text
    where this host puts it). After merging, masked keys must still be the padded ones: a block run on merged
    tokens with 6 masked text tokens equals the same run with those 6 tokens removed (exact arithmetic:
    identical), for double and single blocks, with and without the PR key bias. A mask left unshifted would
    unmask padding."""
    import importlib
    host.load_pack()
    fam = importlib.import_module(f"{host.PACK_NAME}.kernels.families")
    sdtm = importlib.import_module(f"{host.PACK_NAME}.kernels.sdtm")
    patching = importlib.import_module(f"{host.PACK_NAME}.nodes.patching")
    model = host.tiny_hunyuan_video()
    text_first = _hunyuan_text_first(host, model)
    dm = model.model.diffusion_model
    info = patching.detect_family(model, "test")
    n_ref, n_img, n_valid, n_pad = 7, 35, 10, 6
    for single in (False, True):
        spec = info.family.blocks[-1 if single else 0]
        block = (dm.single_blocks if single else dm.double_blocks)[0]

        def original(a, block=block, single=single):
            if single:
                return {"img": block(a["img"], vec=a["vec"], pe=a["pe"], attn_mask=a["attention_mask"],
                                     modulation_dims=a["modulation_dims"],
                                     transformer_options=a["transformer_options"])}
            i, t = block(img=a["img"], txt=a["txt"], vec=a["vec"], pe=a["pe"], attn_mask=a["attention_mask"],
                         modulation_dims_img=a["modulation_dims_img"], modulation_dims_txt=a["modulation_dims_txt"],
                         transformer_options=a["transformer_options"])
            return {"img": i, "txt": t}

        def full_and_short():
            # Fresh tensors per run: the host's double block adds to `txt` in place.
            full = _hunyuan_block_args(dm, n_ref, n_img, n_valid + n_pad, single, text_first)
            text = _text_positions(n_ref, n_img, n_valid + n_pad, text_first)
            pads = list(range(text.start + n_valid, text.stop))
            kept = [i for i in range(n_ref + n_img + n_valid + n_pad) if i not in pads]
            mask = torch.zeros(1, 1, n_ref + n_img + n_valid + n_pad)
            mask[..., pads] = -torch.finfo(torch.float32).max
            full["attention_mask"] = mask
            short = dict(full, attention_mask=None, pe=full["pe"][:, :, kept])
            if single:
                short["img"] = full["img"][:, kept].clone()
            else:
                short["txt"] = full["txt"][:, :n_valid].clone()
            return full, short
        for pr in (False, True):
            method = sdtm.SDTM(sdtm.SDTMConfig(ratio=0.5, deviation=0.0, ratio_adjust=False, prompt_reweight=pr,
                                               skip_first_blocks=0, skip_last_blocks=0))
            outs = []
            for which, args in enumerate(full_and_short()):
                n_txt = n_valid if which else n_valid + n_pad
                span = fam.image_span(spec, args, n_img, n_txt, info.family, text_first)
                assert span.img_start == n_ref + (n_txt if single and text_first else 0)
                tokens = args["img"][:, span.img_start:span.img_start + n_img]
                plan = method.plan(tokens, (5, 7), 1, 4, 0.9)
                assert plan is not None and plan.n_out < n_img
                out = fam.run_block_merged(args, original, plan, span, info.family, method.key_bias(plan))
                outs.append(out["img"][:, span.img_start - n_ref:span.img_start + n_img])  # the image stream
            got, want = outs
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (single, pr, (got - want).abs().max())


def test_hunyuan_video_reference_latent_and_token_replace(host):
    """HunyuanVideo I2V: `ref_latent` tokens come before the latent's and are never merged; the
    guiding-frame (token replace) mode modulates by position ranges, so its calls run unmerged
    (exactly unpatched) rather than with shifted ranges."""
    import comfy.sample
    model = host.tiny_hunyuan_video()
    patched, spy = _patched_with_spy(host, model)
    gen = torch.Generator().manual_seed(5)
    ref = torch.randn(1, 16, 1, 10, 14, generator=gen)
    latent = torch.zeros(1, 16, 3, 10, 14)
    noise = comfy.sample.prepare_noise(latent, 3)

    def run(m, extra):
        # cfg 1 (one conditioning per call): this host's HunyuanVideo writes into an expanded id tensor
        # for ref_latent, which fails with cond and uncond batched, patched or not.
        g = torch.Generator().manual_seed(7)
        conds = [[[torch.randn(1, 16, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g), **extra}]]
                 for _ in range(2)]
        return comfy.sample.sample(m, noise, 4, 1.0, "euler", "simple", conds[0], conds[1], latent,
                                   disable_pbar=True, seed=3)
    base, out = run(model, {"ref_latent": ref}), run(patched, {"ref_latent": ref})
    assert spy.seen and set(spy.seen) == {(105, (3, 5, 7))}, set(spy.seen)
    assert torch.isfinite(out).all() and 1e-3 < _rel(out, base) < 0.4
    spy.seen.clear()
    guided = {"guiding_frame_index": 0}
    assert torch.equal(run(patched, guided), run(model, guided))
    assert not spy.seen


def test_hunyuan_video_pruned_blocks_match_the_full_blocks(host):
    """CAT on the host's own HunyuanVideo double and single blocks, with reference tokens before the image,
    the text where this host puts it and padded text keys masked: with the cache filled from the same input,
    the selected tokens' outputs equal the full block's (the cached keys sit at the image's place, the mask
    keeps the full key length)."""
    import importlib
    host.load_pack()
    cat = importlib.import_module(f"{host.PACK_NAME}.kernels.cat")
    fam = importlib.import_module(f"{host.PACK_NAME}.kernels.families")
    model = host.tiny_hunyuan_video()
    text_first = _hunyuan_text_first(host, model)
    dm = model.model.diffusion_model
    family = fam.hunyuan_video_family("HunyuanVideo", 1, 1)
    n_ref, n_img, n_txt = 7, 35, 16
    gen = torch.Generator().manual_seed(3)
    selection = torch.stack([torch.randperm(n_img, generator=gen)[:9].sort().values for _ in range(2)])
    for single in (False, True):
        block = (dm.single_blocks if single else dm.double_blocks)[0]

        def original(a, block=block, single=single):
            if single:
                return {"img": block(a["img"], vec=a["vec"], pe=a["pe"], attn_mask=a["attention_mask"],
                                     transformer_options=a["transformer_options"])}
            i, t = block(img=a["img"], txt=a["txt"], vec=a["vec"], pe=a["pe"], attn_mask=a["attention_mask"],
                         transformer_options=a["transformer_options"])
            return {"img": i, "txt": t}

        def args():  # fresh tensors per run: the double block adds to `txt` in place
            a = _hunyuan_block_args(dm, n_ref, n_img, n_txt, single, text_first)
            a["attention_mask"] = torch.zeros(1, 1, n_ref + n_img + n_txt)
            text = _text_positions(n_ref, n_img, n_txt, text_first)
            a["attention_mask"][..., text.stop - 5:text.stop] = -torch.finfo(torch.float32).max
            return a
        spec = family.blocks[1 if single else 0]
        span = fam.image_span(spec, args(), n_img, n_txt, family, text_first)
        assert span.img_start == n_ref + (n_txt if single and text_first else 0)
        store = {}
        with torch.no_grad():
            full = cat.run_block_pruned(args(), original, span, family, None, store)
            assert len(store) == 1
            part = cat.run_block_pruned(args(), original, span, family, selection, store)
        idx = (span.img_start + selection)[:, :, None].expand(-1, -1, dm.hidden_size)
        assert torch.allclose(part["img"].gather(1, idx), full["img"].gather(1, idx), atol=1e-5), single


# ---- Lumina 2 / Z-Image (NextDiT): no block hook, layers patched by object patches ----------------------

def test_lumina2_merges_only_the_image_tokens(host):
    """NextDiT's layers read no patches_replace; the pack object-patches each layer's forward to route it
    through the same block replacement. Caption tokens come first and are never merged; the image merges
    on its (H, W) grid; after sampling, the layers' own forward is back (nothing left patched)."""
    model = host.tiny_lumina2()
    latent = torch.zeros(1, 16, 16, 12)
    _check_family(host, model, latent, (8, 6), bound=0.40, **LUMINA_COND)
    # Sampling the unpatched MODEL afterwards unloads the patched one; ComfyUI restores each object patch
    # by setting back what it saved, the class's own bound forward.
    host.sample(model, latent=latent, **LUMINA_COND)
    assert all(getattr(layer.forward, "__func__", None) is type(layer).forward
               for layer in model.model.diffusion_model.layers)


def test_lumina2_masked_caption_runs_unreduced(host):
    """A caption mask that masks any key means rows whose image tokens may start at different places:
    those calls run unreduced, exactly as unpatched. A host that hands its layers no mask (0.33 drops the
    caption mask) attends to every key, and the same patch reduces. (CFG 1: some hosts' NextDiT cannot
    batch a caption mask over cond and uncond, patched or not.)"""
    import importlib
    model = host.tiny_lumina2()
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[0, 3] = 0
    kw = dict(latent=torch.zeros(1, 16, 16, 12), cond_extra={"attention_mask": mask}, cfg=1.0)
    host.load_pack()
    patching = importlib.import_module(f"{host.PACK_NAME}.nodes.patching")
    masked = []  # per layer call: whether the pack saw a mask that masks keys (beneath the method)

    def record(args, extra):
        masked.append("attn_mask" in args)
        return extra["original_block"](args)

    family = patching.detect_family(model, "test").family
    spied = model.clone()
    patching.set_block_replaces(spied, family, {spec.key: record for spec in family.blocks})
    patched, spy = _patched_with_spy(host, spied)
    try:
        unpatched = host.sample(model, **kw)
    except RuntimeError as host_error:
        # Hosts 0.3.75 hand the integer caption mask to SDPA unconverted and fail without the pack: the
        # patched model must fail the same way, never differently and never instead.
        with pytest.raises(RuntimeError) as patched_error:
            host.sample(patched, **kw)
        assert str(patched_error.value) == str(host_error)
    else:
        out = host.sample(patched, **kw)
        assert masked and len(set(masked)) == 1, "the host masks every layer call alike"
        if masked[0]:
            assert torch.equal(out, unpatched) and not spy.seen
        else:
            assert spy.seen, "no key is masked: the image tokens are reduced"
    spy.seen.clear()
    host.sample(patched, latent=kw["latent"], **LUMINA_COND)
    assert spy.seen, "without masked keys the same patch merges"

"""The tokens the pack reduces are exactly the image tokens, checked against each host's own layout.

Every supported family's tiny model samples twice with different noise. A probe beneath the pack's block
replace records each block's input and the queries of its first attention, then passes the input through
unchanged, so no block mixes text into the image: the positions where the two runs differ are where the
host put the latent's image tokens, in the block's arguments and in the joint attention. The span the pack
computes must be exactly those positions. A host that moves the text (HunyuanVideo in 0.33) or the
references fails here, not in a picture.

Every test skips, with the reason, without a ComfyUI checkout; families a host predates skip with that reason.
"""
import importlib
import math

import pytest
import torch

from tools import comfy_host

LUMINA_COND = {"attention_mask": torch.ones(1, 16, dtype=torch.long)}  # caption length 16
REF = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(1))

FAMILIES = {  # builder, latent, conditioning extras
    "flux": ("tiny_flux", (1, 16, 12, 10), {}),
    "flux_kontext": ("tiny_flux", (1, 16, 12, 10), {"reference_latents": [REF]}),
    "flux2": ("tiny_flux2", (1, 128, 6, 5), {}),
    "chroma": ("tiny_chroma", (1, 16, 12, 10), {}),
    "sd3": ("tiny_sd3", (1, 16, 12, 10), {}),
    "wan": ("tiny_wan", (1, 16, 2, 8, 10), {}),
    "qwen_image": ("tiny_qwen_image", (1, 16, 1, 12, 10), {}),
    "qwen_image_edit": ("tiny_qwen_image", (1, 16, 1, 12, 10), {"reference_latents": [REF[:, :, None]]}),
    "hunyuan_video": ("tiny_hunyuan_video", (1, 16, 2, 8, 10), {}),
    "hunyuan_image21": ("tiny_hunyuan_image21", (1, 64, 6, 5), {}),
    "hunyuan_video15": ("tiny_hunyuan_video15", (1, 32, 2, 6, 5), {}),
    "zimage": ("tiny_zimage", (1, 16, 10, 14), {}),
    "lumina2": ("tiny_lumina2", (1, 16, 12, 10), LUMINA_COND),
}


def _probed(host, model):
    """The model patched with a method that only records the span it is given, over a probe that records
    each block's input and first attention queries and returns the input unchanged."""
    host.load_pack()
    patching = importlib.import_module(f"{host.PACK_NAME}.nodes.patching")
    runtime = importlib.import_module(f"{host.PACK_NAME}.kernels.runtime")
    attention = importlib.import_module(f"{host.PACK_NAME}.kernels.attention")
    records = []

    class SpanRecorder(runtime.TokenMethod):
        name = "span recorder"
        span = None

        def run_block(self, block):
            self.span = block.span
            return block.original(block.args)

    method = SpanRecorder()

    def probe(key):
        def replace(args, extra):
            record = {"key": key, "img": args["img"].detach().clone(), "span": method.span, "q": None}
            method.span = None

            def capture(ordinal, a, kw):
                record["q"] = a[0].detach().movedim(attention.seq_dim(kw), 1).flatten(2).clone()
                return a, kw

            copies = {k: v.clone() for k, v in args.items() if k in ("img", "txt") and v is not None}
            to = attention.override_attention(args.get("transformer_options") or {}, capture, first_call_only=True)
            with torch.no_grad():
                extra["original_block"](dict(args, **copies, transformer_options=to))
            records.append(record)
            return {k: args[k] for k in ("img", "txt") if k in args}
        return replace

    info = patching.detect_family(model, "test")
    patched = model.clone()
    patching.set_block_replaces(patched, info.family, {spec.key: probe(spec.key) for spec in info.family.blocks})
    patching.install(patched, method, "span_recorder", info)
    return patched, records, info


def _differing(a, b) -> list:
    """Token positions (axis 1) where two recordings differ."""
    return torch.nonzero((a - b).abs().flatten(2).amax(dim=(0, 2)) > 0).flatten().tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_reduced_tokens_are_the_hosts_image_tokens(host, family):
    builder, shape, extra = FAMILIES[family]
    try:
        model = getattr(host, builder)()
    except comfy_host.HostTooOld as e:
        pytest.skip(str(e))
    patched, records, info = _probed(host, model)
    latent = torch.zeros(shape)
    runs = []
    for seed in (0, 1):
        records.clear()
        host.sample(patched, seed=seed, steps=2, cfg=1.0, latent=latent, cond_extra=extra)
        runs.append(list(records))
    a_run, b_run = runs
    n_blocks = info.family.num_blocks
    assert len(a_run) == len(b_run) == 2 * n_blocks, "one record per block and call"
    patch = info.patch_size
    grid = [math.ceil(s / patch) for s in shape[2:]]
    n_img = math.prod([shape[2]] + grid[1:] if len(shape) == 5 else grid)
    # Z-Image pads the image to a multiple of 32 and its refiner layers mix the padding with the image, so
    # the padding differs too: there the latent-dependent tokens are the image, then its padding.
    pad = (-n_img) % info.family.pad_multiple if info.family.pad_multiple else 0
    for a, b in zip(a_run[n_blocks:], b_run[n_blocks:]):  # the second call: every order is known by then
        span = a["span"]
        assert span is not None, f"{family} {a['key']}: the pack did not offer the block to the method"
        assert span.n_img == n_img
        where = _differing(a["img"], b["img"])
        assert where == list(range(span.img_start, span.img_start + n_img + pad)), \
            f"{family} {a['key']}: image tokens at {where[:3]}..{where[-3:]}, the pack reduces from {span.img_start}"
        assert a["q"] is not None, f"{family} {a['key']}: no attention seen"
        where = _differing(a["q"], b["q"])
        assert where == list(range(span.key_offset, span.key_offset + n_img + pad)), \
            f"{family} {a['key']}: image queries at {where[:3]}..{where[-3:]}, the pack's keys from {span.key_offset}"

"""The embedded reference DiT (tools/reference_dit.py) and the demo (tools/demo.py); no ComfyUI needed.

All tests use seeded random init (weights=None), so that their bounds do not move
when trained weights are added under tools/weights/.

PSNR_BOUND_DB sits below what every-step SDTM merging keeps on this small model over several
init and noise seeds, and far above what a different noise seed gives.
"""
from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import numpy as np

import pytest
import torch

from kernels.flops import block_flops
from kernels.runtime import CALL_KEY, RUNS_KEY
from kernels.sdtm import EVERY_STEP_MERGED, SDTM, SDTMConfig
from tools import demo, procedural
from tools import reference_dit as R
from tools.comfy_host import PACK_ROOT

CFG = R.DiTConfig(image_size=32, hidden=64, heads=2, axes_dim=(8, 12, 12), depth_double=2, depth_single=4)
CLASSES = [0, 1]
STEPS = 4
PSNR_BOUND_DB = 15.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    m, source = R.build_model(CFG, seed=0, weights=None)
    assert "random init" in source
    return m


@pytest.fixture(scope="module")
def baseline(model):
    return R.sample(model, CLASSES, steps=STEPS, seed=0)


def _sample(model, options, **kw):
    return R.sample(model, CLASSES, steps=kw.pop("steps", STEPS), seed=kw.pop("seed", 0),
                    transformer_options=options, **kw)


def test_model_runs(model):
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        v = model(x, torch.full((3,), 0.7), torch.tensor([0, 1, CFG.num_classes]))
    assert v.shape == x.shape and torch.isfinite(v).all()
    # Non-square and a size other than the configured one work (rotary positions).
    with torch.inference_mode():
        v = model(torch.randn(1, 3, 16, 24), torch.tensor([0.3]), torch.tensor([2]))
    assert v.shape == (1, 3, 16, 24)


def test_pe_format(model):
    b, h, w = 2, 4, 6
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    ids = torch.cat([torch.zeros(b, CFG.txt_len, 3), img_ids.reshape(1, h * w, 3).expand(b, -1, -1)], 1)
    pe = model.pe_embedder(ids)
    assert pe.shape == (b, 1, CFG.txt_len + h * w, CFG.hidden // CFG.heads // 2, 2, 2)
    assert pe.dtype == torch.float32
    # Rotation matrices [[cos, -sin], [sin, cos]]; text ids are zero -> identity.
    assert torch.allclose(pe[..., 0, 0], pe[..., 1, 1]) and torch.allclose(pe[..., 0, 1], -pe[..., 1, 0])
    assert torch.equal(pe[:, :, :CFG.txt_len], torch.eye(2).expand_as(pe[:, :, :CFG.txt_len]))


def test_deterministic_without_patches(model, baseline):
    assert torch.isfinite(baseline).all()
    assert torch.equal(_sample(model, None), baseline)
    assert torch.equal(_sample(model, {}), baseline)
    assert not torch.equal(_sample(model, None, seed=1), baseline)


def test_ab2_sampler_integrates_a_linear_velocity_closer_than_euler(model, monkeypatch):
    """A velocity that is linear in sigma and independent of x: the exact end point is x(1) minus its
    integral. AB2 (second order; its first step is Euler) lands far closer than Euler, and makes the
    same number of model calls; a velocity constant in sigma gives both the same result."""
    calls = []

    def fake_call(m, x, sigma, class_ids, transformer_options=None):
        calls.append(sigma)
        return torch.full_like(x, slope * float(sigma) + 0.5)

    monkeypatch.setattr(R, "model_call", fake_call)
    noise = R.initial_noise(model.config, len(CLASSES), seed=0)
    for slope in (2.0, 0.0):
        calls.clear()
        euler = R.sample(model, CLASSES, steps=5, seed=0, cfg=1.0, sampler="euler")
        assert len(calls) == 5
        calls.clear()
        ab2 = R.sample(model, CLASSES, steps=5, seed=0, cfg=1.0, sampler="ab2")
        assert len(calls) == 5
        exact = noise - (0.5 + slope / 2)
        if slope:
            assert (ab2 - exact).abs().max() < 0.25 * (euler - exact).abs().max()
        else:
            assert torch.allclose(ab2, euler, atol=1e-6) and torch.allclose(ab2, exact, atol=1e-5)
    with pytest.raises(ValueError, match="sampler"):
        R.sample(model, CLASSES, steps=2, sampler="heun")


def test_pass_through_replace_is_bit_identical(model, baseline):
    seen = []

    def make(key):
        def replace(args, extra):
            seen.append((key, frozenset(args)))
            assert args["transformer_options"] is not None and callable(extra["original_block"])
            return extra["original_block"](args)
        return replace

    dit = {spec.key: make(spec.key) for spec in model.family().blocks}
    out = _sample(model, {"patches_replace": {"dit": dit}})
    assert torch.equal(out, baseline)
    double = frozenset({"img", "txt", "vec", "pe", "attn_mask", "transformer_options"})
    single = frozenset({"img", "vec", "pe", "attn_mask", "transformer_options"})
    assert {k for k, _ in seen} == set(dit)
    assert all(keys == (double if k[0] == "double_block" else single) for k, keys in seen)
    assert len(seen) == STEPS * len(dit)


def test_block_args_layout_and_progress(model):
    """Single-stream img = cat(txt, img); pe covers txt + img tokens; progress = 1 - sigma."""
    grid = CFG.image_size // CFG.patch_size
    log = []

    def probe(args, extra):
        call = args["transformer_options"][CALL_KEY]
        log.append((args["img"].shape[1], args["pe"].shape, call.progress, call.grid, call.n_img, call.n_txt))
        return extra["original_block"](args)

    dummy = SDTM(SDTMConfig(start_percent=1.0))
    to = R.method_options(dummy, model)
    to["patches_replace"]["dit"][("single_block", 0)] = probe
    _sample(model, to)
    n_tok = CFG.txt_len + grid * grid
    assert len(log) == STEPS
    for (n, pe_shape, progress, g, n_img, n_txt), sigma in zip(log, R.sigmas(STEPS)):
        assert n == n_tok and pe_shape == (2 * len(CLASSES), 1, n_tok, CFG.hidden // CFG.heads // 2, 2, 2)
        assert progress == pytest.approx(1.0 - sigma, abs=1e-9)
        assert g == (grid, grid) and n_img == grid * grid and n_txt == CFG.txt_len


def test_attention_override_is_honoured(model, baseline):
    calls = []

    def override(func, *args, **kwargs):
        calls.append((args[3], kwargs.get("skip_reshape"), "transformer_options" in kwargs, kwargs.get("mask")))
        return func(*args, **kwargs)

    out = _sample(model, {"optimized_attention_override": override})
    assert torch.equal(out, baseline)
    assert len(calls) == STEPS * (CFG.depth_double + CFG.depth_single)
    assert all(h == CFG.heads and sr is True and has_to and m is None for h, sr, has_to, m in calls)

    # The base attention accepts an additive float mask broadcastable to (B, H, Lq, Lk).
    q, k, v = (torch.randn(2, CFG.heads, 5, 8) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 5)
    mask[:, ..., -1] = float("-inf")
    ref = R.attention_sdpa(q, k[:, :, :4], v[:, :, :4], CFG.heads, skip_reshape=True)
    assert torch.allclose(R.attention_sdpa(q, k, v, CFG.heads, mask=mask, skip_reshape=True), ref, atol=1e-6)


def test_sdtm_inactive_is_bit_identical(model, baseline):
    to = R.method_options(SDTM(SDTMConfig(start_percent=1.0)), model)
    assert torch.equal(_sample(model, to), baseline)
    st = to[RUNS_KEY]["sdtm"].stats
    assert st.merged_calls == 0 and st.tokens_computed == st.tokens_in > 0


def test_sdtm_merging_stays_close_to_baseline(model, baseline):
    to = R.method_options(SDTM(SDTMConfig(**EVERY_STEP_MERGED)), model)
    out = _sample(model, to)
    assert not torch.equal(out, baseline) and torch.isfinite(out).all()
    p = R.psnr(out, baseline)
    assert p > PSNR_BOUND_DB, f"SDTM merging: PSNR {p:.2f} dB vs baseline"
    assert to[RUNS_KEY]["sdtm"].stats.merged_calls > 0
    # Merging less stays closer.
    light = _sample(model, R.method_options(SDTM(SDTMConfig(**{**EVERY_STEP_MERGED, "ratio": 0.2})), model))
    assert R.psnr(light, baseline) > p
    # Chained over an existing pass-through replace, the result is the same.
    passthrough = {s.key: (lambda a, e: e["original_block"](a)) for s in model.family().blocks}
    chained = R.method_options(SDTM(SDTMConfig(**EVERY_STEP_MERGED)), model,
                               base={"patches_replace": {"dit": passthrough}})
    assert torch.equal(_sample(model, chained), out)


class RecordingSDTM(SDTM):
    """SDTM that records (block, tokens in, tokens out) of every plan request."""

    def __init__(self, config):
        super().__init__(config)
        self.calls = []

    def plan(self, metric, grid, block, num_blocks, progress):
        plan = super().plan(metric, grid, block, num_blocks, progress)
        n = metric.shape[1]
        self.calls.append((block, metric.shape[0], n, n if plan is None else plan.n_out))
        return plan


def test_flops_drop_as_predicted(model):
    def count(options):
        with R.flop_counter() as fc:
            _sample(model, options)
        return fc.get_total_flops()

    base = count(None)
    method = RecordingSDTM(SDTMConfig(**EVERY_STEP_MERGED))
    merged = count(R.method_options(method, model))
    n_img = (CFG.image_size // CFG.patch_size) ** 2
    # The analytic block cost explains the measured baseline (SDPA included).
    per_call = (CFG.depth_double + CFG.depth_single) * block_flops(CFG.txt_len + n_img, CFG.hidden, CFG.mlp_ratio)
    analytic_base = STEPS * 2 * len(CLASSES) * per_call
    assert 0.97 < analytic_base / base <= 1.0
    # Removing tokens removes their block cost; the remainder is merge/match overhead.
    saved = sum(b * (block_flops(CFG.txt_len + n, CFG.hidden, CFG.mlp_ratio)
                     - block_flops(CFG.txt_len + m, CFG.hidden, CFG.mlp_ratio)) for blk, b, n, m in method.calls)
    predicted = 1.0 - saved / base
    measured = merged / base
    token_fraction = sum(m for *_, m in method.calls) / sum(n for *_, n, _ in method.calls)
    assert token_fraction < 0.75
    assert measured < token_fraction  # attention is quadratic: FLOPs fall faster than tokens
    print(f"FLOPs: measured ratio {measured:.4f}, predicted {predicted:.4f}, token fraction {token_fraction:.4f}, "
          f"analytic/measured baseline {analytic_base / base:.4f}")
    assert predicted - 1e-3 < measured < predicted + 0.025, (measured, predicted)  # + merge/match overhead


def test_weights_round_trip(model, tmp_path):
    path = tmp_path / "w.safetensors"
    R.save_weights(model, path)
    loaded, source = R.build_model(weights=path)
    assert "trained weights" in source and loaded.config == CFG
    x = torch.randn(1, 3, 16, 16)
    s, c = torch.tensor([0.5]), torch.tensor([1])
    with torch.inference_mode():
        assert torch.equal(loaded(x, s, c), model(x, s, c))
    with pytest.raises(ValueError):
        R.build_model(R.DiTConfig(), weights=path)
    _, source = R.build_model(CFG, weights=tmp_path / "missing.safetensors")
    assert "random init" in source
    assert R.shown_path(R.WEIGHTS_PATH) == "tools/weights/reference_dit.safetensors"  # pages name no machine's path
    assert R.shown_path(path) == str(path)


def _read_png(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()  # filter type None
    return rows[:, 1:].reshape(h, w, 3)


def test_png_writer(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert np.array_equal(_read_png(demo.png_bytes(rgb)), rgb)
    path = demo.write_png(tmp_path / "a" / "x.png", rgb)
    assert np.array_equal(_read_png(path.read_bytes()), rgb)
    canvas = demo.side_by_side([torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)], scale=2, pad=1)
    assert canvas.shape == (1 + 2 * 9, 1 + 2 * 9, 3)
    assert (canvas[1:9, 1:9] == 128).all() and (canvas[10:18, 10:18] == 255).all()
    with pytest.raises(ValueError):
        demo.png_bytes(np.zeros((4, 4), np.uint8))


def test_demo_end_to_end(tmp_path, capsys):
    result = demo.main(["--out", str(tmp_path), "--model", "64px", "--steps", "4", "--classes", "4,6",
                        "--scale", "1", "--threads", "1"])
    img = _read_png((tmp_path / "demo_side_by_side.png").read_bytes())
    rows = result["rows"]
    assert [r.name for r in rows] == ["UNPATCHED", "SDTM", "DENSITY", "CAT", "STEP CACHE, NO TOKEN WORK",
                                      "2 STEPS, NOT 4"]
    assert img.shape[0] > len(rows) * 64 and img.shape[1] > 2 * 64
    label_column = img[:, :60]
    assert (label_column < 100).any(), "the rows carry their labels"
    assert rows[0].flops == 1.0 and rows[-1].flops == 0.5
    for r in rows[1:-1]:
        assert 0.0 < r.flops < 1.0 and r.psnr < float("inf"), r.name
    cat, cache = rows[3], rows[4]
    assert cache.flops < cat.flops, "the step cache keeps CAT's full steps and computes nothing between them"
    printed = capsys.readouterr().out
    assert printed.count("| ") >= len(rows) and result["recommendation"].lower() in printed.lower()
    assert (tmp_path / "demo_table.md").read_text().startswith("| setting |")


@pytest.mark.parametrize("classes, scale", [(1, 1), (3, 2)])
def test_demo_picture_keeps_every_text_inside_it(classes, scale, monkeypatch):
    """Headline, class names, row labels and the caption under the pictures all lie inside the picture, however
    long: they wrap (a word too long for a line is cut), and the caption never widens the picture."""
    drawn = []

    def draw_text(img, text, x, y, text_scale=1, colour=None):
        drawn.append((text, x, y, text_scale, img.shape))
        demo_draw_text(img, text, x, y, text_scale, colour)

    demo_draw_text = demo.draw_text
    monkeypatch.setattr(demo, "draw_text", draw_text)
    rows = [demo.Row(name, torch.rand(classes, 3, 64, 64) * 2 - 1, 0.5, 0.1, 30.0, 1.0)
            for name in ("UNPATCHED", "DENSITY SCHEDULE", "9 STEPS, NOT 10")]
    caption = "SDTM, DENSITY SCHEDULE AND CAT STAY WITHIN 0.3 DB OF EACH OTHER, " * 3 + "X" * 90
    titles = ["HORIZONTAL STRIPES", "CHECKERBOARD", "RADIAL GRADIENT WITH NOISE"][:classes]
    canvas = demo.labelled(rows, titles, "REFERENCE DIT 128 PX, 10 STEPS, CFG 3, SEED 0 " * 2, caption, scale)
    h, w = canvas.shape[:2]
    assert w < demo.text_width(caption, 2) and drawn
    for text, x, y, text_scale, shape in drawn:
        assert shape[:2] == (h, w)
        assert 0 <= x and x + demo.text_width(text, text_scale) <= w and 0 <= y and y + 5 * text_scale <= h, \
            (text, x, y, w, h)
    texts = [t for t, *_ in drawn]  # the caption is drawn last, in lines
    caption_letters = caption.replace(" ", "")
    lines = next(k for k in range(1, len(texts) + 1) if "".join(texts[-k:]).replace(" ", "") == caption_letters)
    assert lines > 1


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: must be at least 1, got 0"),
    (["--steps", "2"], "--steps must be at least 4"),
    (["--classes", ""], "--classes: a comma-separated list of whole numbers expected, got nothing"),
    (["--classes", "a"], "--classes: a comma-separated list of whole numbers expected, got 'a'"),
    (["--classes", "12"], "--classes: 12 outside 0..9"),
    (["--out", "/proc/x/y"], "--out: cannot write to /proc/x/y"),
    (["--model", "512px"], "argument --model: invalid choice"),
])
def test_demo_refuses_bad_arguments_in_one_line(argv, message):
    res = subprocess.run([sys.executable, str(PACK_ROOT / "tools" / "demo.py"), *argv], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_model_configs_match_the_shipped_weights_and_the_data():
    for name, config in R.MODEL_CONFIGS.items():
        assert config.num_classes == len(procedural.dataset(config.data).names), name
        if R.MODELS[name].is_file():
            assert R.load_weights(R.MODELS[name]).config == config, name


def test_the_256px_model_has_fluxs_token_grid_and_fits_40_mb_in_bf16():
    config = R.MODEL_CONFIGS["256px"]
    assert (config.image_size // config.patch_size) ** 2 == 64 * 64 and config.data == "scenes"
    model = R.ReferenceDiT(config)
    n = sum(p.numel() for p in model.parameters())
    assert 2 * n < 16 * 2 ** 20, n  # bf16 bytes: under 40 MB, and under the 16 MiB a GPU session's file may have
    assert config.hidden // config.heads % 8 == 0  # a head size the flash attention kernels take


def test_missing_256px_weights_are_named_not_trained(tmp_path, monkeypatch, capsys):
    """demo.py refuses in one line (exit 2); compare.py samples seeded random init, labelled so."""
    from tools import compare
    monkeypatch.setitem(R.MODELS, "256px", tmp_path / "reference_dit_256.safetensors")
    with pytest.raises(SystemExit) as e:
        demo.parse_args(["--model", "256px", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--model 256px: the 256px weights are not trained yet" in err
    model, source = compare.reference_model("256px")
    assert "random init" in source and "the 256px weights are not trained yet" in source
    assert model.config == R.MODEL_CONFIGS["256px"]
    assert compare.parse_args(["--model", "256px"]).model == "256px"


def test_demo_validates_classes_against_the_models_data(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--model", "256px", "--classes", "10"])
    assert "(0 mountains, 1 house, 2 still life" in capsys.readouterr().err


def test_matches_comfyui_flux(host, model):
    """With the same weights, ComfyUI's own Flux gives the reference model's output, patched or not.

    Skips (with the reason) where no ComfyUI host can be imported.
    """
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    # Every field this host version needs comes from its own detection of a Flux checkpoint; the sizes are ours.
    # The weights load through its state-dict conversion, as a checkpoint's do.
    model_config = host.detected_model_config("flux")
    params = {**model_config.unet_config, **CFG.flux_params()}
    flux = Flux(operations=comfy.ops.disable_weight_init, dtype=torch.float32, device=torch.device("cpu"), **params)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("class_")}
    flux.load_state_dict(model_config.process_unet_state_dict(weights), strict=True)
    flux.eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    ids = torch.tensor([0, 1, CFG.num_classes, CFG.num_classes])
    from_first = SDTMConfig(**{**EVERY_STEP_MERGED, "start_percent": 0.0})  # sigma 0.9 is at progress ~0.1
    for sigma, options in ((0.9, None), (0.9, R.method_options(SDTM(from_first), model)),
                           (0.3, R.method_options(SDTM(from_first), model))):
        with torch.inference_mode():
            ours = R.model_call(model, x, sigma, ids, options)
            txt, y = model.condition(ids)
            to = dict(options or {})
            for hook in to.get(R.APPLY_MODEL_HOOKS_KEY, []):
                hook(x, sigma, to)
            theirs = flux(x, torch.full((4,), sigma), txt, y=y, transformer_options=to)
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), (sigma, (ours - theirs).abs().max())
        if options is not None:
            assert options[RUNS_KEY]["sdtm"].stats.merged_calls > 0


def test_an_evidence_page_states_its_own_models_training_record():
    from tools import compare
    lines = {name: compare.weights_line(path) for name, path in compare.REFERENCE_MODELS.items() if path.is_file()}
    assert {"64px", "128px"} <= set(lines)
    assert lines["64px"] != lines["128px"]
    assert f"steps {R.weights_metadata(compare.REFERENCE_MODELS['128px'])['steps']}," in lines["128px"]

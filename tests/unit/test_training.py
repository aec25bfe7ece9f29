"""Procedural data (tools/procedural.py), training (tools/train_reference.py) and the shipped
trained weights (tools/weights/reference_dit.safetensors); no ComfyUI needed.

Velocity errors are mean squared errors of the predicted v = noise - image on fresh procedural
images (train_reference.velocity_mse, held-out seed). The "zero" predictor (v = 0) scores
E|noise - image|^2; a random-init model scores worse than that.
"""
from __future__ import annotations

import math

import pytest
import torch

from tools import procedural as P
from tools import reference_dit as R
from tools import train_reference as T

TINY = '{"image_size": 16, "patch_size": 4, "hidden": 32, "heads": 2, "axes_dim": [4, 6, 6], ' \
       '"depth_double": 1, "depth_single": 1}'


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed, n=20, **kw):
    return P.sample_batch(n, torch.Generator().manual_seed(seed), **kw)


def test_procedural_deterministic_and_in_range():
    a, la = _batch(3)
    b, lb = _batch(3)
    c, _ = _batch(4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.allclose(a, c)
    assert a.shape == (20, 3, 64, 64) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.2
    assert la.min() >= 0 and la.max() < P.NUM_CLASSES and len(P.CLASS_NAMES) == P.NUM_CLASSES
    x, lab = _batch(0, n=6, size=32, labels=[0, 1, 2, 3, 4, 5])
    assert x.shape == (6, 3, 32, 32) and lab.tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        _batch(0, n=2, labels=[0, P.NUM_CLASSES])


def _grad(x):
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    return dy, dx


def test_procedural_classes_have_their_structure():
    n = 16
    h, _ = _batch(1, n=n, labels=[4] * n)  # horizontal stripes: intensity changes along y
    v, _ = _batch(1, n=n, labels=[5] * n)  # vertical stripes: along x
    hdy, hdx = _grad(h)
    vdy, vdx = _grad(v)
    assert (hdy > 1.5 * hdx).all() and (vdx > 1.5 * vdy).all()
    # same random draws, different class -> different image; the background is shared
    a, _ = _batch(2, n=P.NUM_CLASSES, labels=list(range(P.NUM_CLASSES)))
    for c in range(1, P.NUM_CLASSES):
        b, _ = _batch(2, n=P.NUM_CLASSES, labels=[c] + list(range(1, P.NUM_CLASSES)))
        assert (a[0] - b[0]).abs().amax() > 0.3, P.CLASS_NAMES[c]
    # smooth regions and sharp edges in every image: most pixel steps are small, a few are large
    x, _ = _batch(5, n=40)
    step = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(dim=1)  # (n, H, W-1)
    smooth = (step < 0.15).float().mean(dim=(1, 2))  # stripes and dots are mostly edges
    assert (smooth > 0.3).all() and smooth.mean() > 0.75
    top = step.amax(dim=(1, 2))
    assert (top > 0.12).all() and (top > 2.5 * step.flatten(1).median(dim=1).values).all()


def test_training_reduces_velocity_error(tmp_path):
    out = tmp_path / "tiny.safetensors"
    args = ["--steps", "60", "--batch", "16", "--lr", "3e-3", "--warmup", "5", "--config", TINY, "--out", str(out),
            "--save-every", "0", "--log-every", "1000", "--seed", "1", "--ema", "0.9"]
    before = T.init_model(R.DiTConfig(**{**T.TRAIN_CONFIG, **__import__("json").loads(TINY)}), 1).eval()
    err0 = T.velocity_mse(before, 0.5, n=64)
    result = T.train(args)
    err1 = T.velocity_mse(result["model"].eval(), 0.5, n=64)
    assert result["steps"] == 60
    assert err1 < 0.8 * err0, (err0, err1)
    meta = R.weights_metadata(out)
    assert meta["steps"] == "60" and meta["seed"] == "1" and meta["complete"] == "true" and meta["device"] == "cpu"
    assert meta["command"].startswith("python tools/train_reference.py ") and "--steps 60" in meta["command"]
    loaded, source = R.build_model(weights=out)
    assert "trained" in source and loaded.config.image_size == 16
    assert all(p.dtype == torch.float32 for p in loaded.parameters())  # stored float16, loaded float32
    for (k, p), q in zip(result["ema"].state_dict().items(), loaded.state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-4), k
    # continuing from the file: steps add up and the commands chain
    more = tmp_path / "more.safetensors"
    T.train(["--init-from", str(out), "--steps", "3", "--batch", "4", "--out", str(more), "--save-every", "0",
             "--log-every", "1000"])
    meta2 = R.weights_metadata(more)
    assert meta2["steps"] == "63" and meta2["command"].startswith(meta["command"] + " && ")
    assert R.load_weights(more).config == loaded.config


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (training with --device cuda)")
def test_training_on_cuda_matches_the_cpu_data(tmp_path):
    """--device cuda trains on the same procedural batches (drawn on the CPU) and saves CPU weights."""
    out = tmp_path / "cuda.safetensors"
    result = T.train(["--steps", "3", "--batch", "4", "--config", TINY, "--out", str(out), "--save-every", "0",
                      "--log-every", "1000", "--device", "cuda"])
    assert next(result["model"].parameters()).is_cuda and R.weights_metadata(out)["device"] == "cuda"
    assert torch.isfinite(torch.tensor(result["losses"])).all()
    assert R.load_weights(out).config.image_size == 16


# ---- the GPU profile, at tiny size on the CPU ------------------------------------------------------------

TINY_256 = '{"image_size": 32, "hidden": 32, "heads": 2, "axes_dim": [4, 6, 6], "depth_double": 1, "depth_single": 2}'


def test_gpu_profile_trains_on_scenes_with_workers_bf16_and_compiled_blocks(tmp_path, capsys):
    """The path a GPU run takes, minus the GPU: --model 256px (the scenes), pictures from a background worker,
    bf16 autocast, compiled blocks (dynamo with the eager backend: the tracing a GPU compile does), bf16 storage,
    and the metadata a GPU run records."""
    from safetensors import safe_open
    out = tmp_path / "tiny256.safetensors"
    result = T.train(["--model", "256px", "--config", TINY_256, "--steps", "4", "--batch", "4", "--workers", "1",
                      "--bf16", "--compile", "eager", "--dtype", "bfloat16", "--out", str(out), "--log-every", "2",
                      "--save-every", "0"])
    assert result["steps"] == 4 and result["compile"] == "eager" and len(result["losses"]) == 4
    assert all(math.isfinite(v) for v in result["losses"])
    assert isinstance(result["model"].double_blocks[0], R.DoubleStreamBlock), "the eager blocks are put back"
    meta = R.weights_metadata(out)
    assert meta["data"] == "tools/procedural.py sample_scenes" and meta["bf16"] == "true" and meta["workers"] == "1"
    assert meta["compile"] == "eager" and meta["device_name"].startswith("CPU") and int(meta["images_per_second"]) > 0
    assert "--model 256px" in meta["command"]
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("img_in.weight").dtype == torch.bfloat16
    loaded = R.load_weights(out)
    assert loaded.config.data == "scenes" and loaded.config.image_size == 32 and loaded.config.hidden == 32
    assert "waited for data" in capsys.readouterr().out


def test_worker_pictures_are_reproducible_and_differ_between_workers():
    a = next(iter(T.PictureStream("scenes", 3, 16, seed=5)))
    b = next(iter(T.PictureStream("scenes", 3, 16, seed=5)))
    c = next(iter(T.PictureStream("scenes", 3, 16, seed=6)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_a_compile_that_fails_falls_back_to_eager_with_one_line(tmp_path, capsys, monkeypatch):
    class Broken(torch.nn.Module):  # what a compiler that cannot build the block leaves behind
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, *args, **kwargs):
            raise RuntimeError("backend compiler failed\nlong traceback")

    monkeypatch.setattr(T.torch, "compile", lambda block, backend: Broken(block))
    result = T.train(["--config", TINY, "--steps", "2", "--batch", "4", "--compile", "eager",
                      "--out", str(tmp_path / "w.safetensors"), "--save-every", "0", "--log-every", "1000"])
    printed = capsys.readouterr().out
    assert result["steps"] == 2 and result["compile"] == "failed"
    assert printed.count("failed, training eager: RuntimeError: backend compiler failed") == 1
    assert R.weights_metadata(tmp_path / "w.safetensors")["compile"] == "failed"


def test_evaluation_prints_loss_per_sigma_the_class_probe_and_the_verdict(tmp_path, capsys):
    out = tmp_path / "tiny256.safetensors"
    T.train(["--model", "256px", "--config", TINY_256, "--steps", "2", "--batch", "4", "--out", str(out),
             "--save-every", "0", "--log-every", "1000"])
    grid = tmp_path / "grid.png"
    res = T.train(["--model", "256px", "--evaluate", "--out", str(out), "--grid", str(grid), "--probe-steps", "3",
                   "--samples-per-class", "2"])
    printed = capsys.readouterr().out
    assert set(res["table"]) == set(T.SIGMAS) and len(res["per_class"]) == len(P.SCENE_NAMES)
    for trained, random_init, zero in res["table"].values():
        assert random_init > zero > 0 and trained > 0  # two steps from the zero init: about the zero predictor
    assert res["good"] is False and "NOT YET: the bar is a class probe accuracy of at least 80%" in printed
    assert "class probe:" in printed and "mountains" in printed and grid.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["--model", "256px", "--config", '{"num_classes": 3}'], "num_classes 3 does not match the 10 classes"),
    (["--config", '{"data": "photos"}'], "unknown procedural data set 'photos'"),
    (["--compile", "max"], "argument --compile: invalid choice"),
])
def test_training_refuses_bad_arguments_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        T.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_evaluating_missing_256px_weights_says_they_are_not_trained(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(R.MODELS, "256px", tmp_path / "reference_dit_256.safetensors")
    with pytest.raises(SystemExit) as e:
        T.parse_args(["--model", "256px", "--evaluate"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the 256px weights are not trained yet" in err and len(err.strip().splitlines()) == 1


# ---- the shipped weights ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    if not R.WEIGHTS_PATH.is_file():
        pytest.skip(f"no trained weights at {R.WEIGHTS_PATH} (run tools/train_reference.py)")
    model, source = R.build_model()
    assert "trained" in source
    return model


def test_shipped_weights_file(trained):
    assert R.WEIGHTS_PATH.stat().st_size < 10 * 2 ** 20
    meta = R.weights_metadata(R.WEIGHTS_PATH)
    for key in ("command", "seed", "steps", "final_loss", "date", "config"):
        assert meta.get(key), key
    assert meta["command"].startswith("python tools/train_reference.py")
    assert int(meta["steps"]) >= 1000 and float(meta["final_loss"]) < 0.2
    assert trained.config == R.DiTConfig(**T.TRAIN_CONFIG)


@pytest.mark.parametrize("sigma", [0.3, 0.6])
def test_trained_model_denoises(trained, sigma):
    random_init, _ = R.build_model(trained.config, weights=None)
    err = T.velocity_mse(trained, sigma, n=32)
    err_random = T.velocity_mse(random_init, sigma, n=32)
    gen = torch.Generator().manual_seed(12345)
    _, _, _, v = T.flow_batch(32, gen, trained.config, sigma=sigma)
    err_zero = v.pow(2).mean().item()  # predicting v = 0
    print(f"sigma {sigma}: trained {err:.4f}, random init {err_random:.4f}, zero predictor {err_zero:.4f}")
    # wide margins around what the shipped weights score (printed above)
    assert err < 0.05 * err_random and err < 0.15 * err_zero, (err, err_random, err_zero)

"""The procedural scenes of the 256px reference model (tools/procedural.py sample_scenes), the class probe that
asks whether a model draws its classes (tools/class_probe.py), and the shapes data the 64px and 128px weights
were trained on, which must not change."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tools import class_probe
from tools import procedural as P
from tools import reference_dit as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scenes(seed, n=20, **kw):
    return P.sample_scenes(n, torch.Generator().manual_seed(seed), **kw)


def test_scenes_deterministic_in_range_and_labelled():
    a, la = _scenes(3, size=64)
    b, lb = _scenes(3, size=64)
    c, _ = _scenes(4, size=64)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.allclose(a, c)
    assert a.shape == (20, 3, 64, 64) and a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1
    assert 0 <= la.min() and la.max() < len(P.SCENE_NAMES)
    x, lab = _scenes(0, n=12, size=32, labels=list(range(10)) + [0, 0])
    assert x.shape == (12, 3, 32, 32) and lab.tolist() == list(range(10)) + [0, 0]
    with pytest.raises(ValueError, match="labels must lie in"):
        _scenes(0, n=2, labels=[0, len(P.SCENE_NAMES)])
    assert P.dataset("scenes").names == P.SCENE_NAMES and P.dataset("shapes").sample is P.sample_batch
    with pytest.raises(ValueError, match="unknown procedural data set"):
        P.dataset("photos")


def test_every_scene_kind_has_smooth_regions_edges_and_detail_at_several_scales():
    """What token reduction meets in real pictures, in every picture of every kind (measured at 128 px)."""
    n = 4
    for kind, name in enumerate(P.SCENE_NAMES):
        x, _ = _scenes(kind, n=n, size=128, labels=[kind] * n)
        step = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(dim=1)
        assert ((step < 0.05).float().mean(dim=(1, 2)) > 0.6).all(), f"{name}: large smooth regions"
        assert (step.amax(dim=(1, 2)) > 0.5).all(), f"{name}: sharp edges"
        level = x
        for octave in range(4):  # the detail lost by each 2x pooling: texture and edges at 1, 2, 4, 8 px
            down = F.avg_pool2d(level, 2)
            detail = (level - F.interpolate(down, scale_factor=2, mode="nearest")).pow(2).mean(dim=(1, 2, 3)).sqrt()
            assert (detail > 0.01).all(), f"{name}: detail at {2 ** octave} px"
            level = down
        assert (x.std(dim=(1, 2, 3)) > 0.15).all(), f"{name}: contrast"


def test_scene_kinds_are_told_apart_by_the_class_probe():
    """A small CNN learns the ten kinds from a few batches: the classes are what they claim to be, distinctly
    (tools/class_probe.py is the same probe the evaluation asks whether a model draws its classes)."""
    probe = class_probe.train_probe("scenes", size=32, steps=60, batch=32, seed=1)
    assert class_probe.real_accuracy(probe, "scenes", 32) >= 0.9
    images, labels = _scenes(7, n=30, size=32)
    assert class_probe.accuracy(probe, images, labels) >= 0.8
    assert class_probe.predictions(probe, images).shape == (30,)


def test_the_shapes_data_of_the_shipped_weights_is_unchanged():
    """The 64px and 128px weights were trained on sample_batch: its draws are pinned (class ids exactly, picture
    means to 1e-4, which torch builds that share the CPU RNG reproduce)."""
    x, labels = P.sample_batch(10, torch.Generator().manual_seed(0))
    assert labels.tolist() == [4, 9, 3, 0, 3, 9, 7, 3, 7, 3]
    means = [-0.0647, -0.3902, 0.1519, 0.2442, 0.0467, -0.0869, -0.1844, 0.0602, -0.189, 0.4594]
    assert torch.allclose(x.mean(dim=(1, 2, 3)), torch.tensor(means), atol=1.5e-4)
    for name in ("64px", "128px"):
        assert R.MODEL_CONFIGS[name].data == "shapes"

"""Host test: every row of tools/compare.py's tiny-ComfyUI table builds and samples.

The host section of tools/compare.py is a command, not a test; this checks that each of its rows
patches the host's own tiny Flux and SD3 models through the real nodes (or says why it cannot), that
the input model is left as it was, and that every patched row moves the output (the unpatched row
does not).
"""
from __future__ import annotations

import pytest
import torch

from test_host_sdtm import assert_same_snapshot, snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_every_host_row_builds_and_samples(host, family):
    from tools import compare as C
    make = {"flux": lambda: host.tiny_flux(seed=0, depth=2, depth_single=4),
            "sd3": lambda: host.tiny_sd3(seed=0, depth=3)}[family]
    model = make()
    rows = C.host_rows(family, steps=6, px=128)
    names = [r.name for r in rows]
    assert len(set(names)) == len(names)
    assert {"SDTM balanced (node)", "CAT balanced (node)", "Density balanced (node)"} <= set(names)
    assert sum("calibrated schedule" in n for n in names) == len(C.CALIBRATED_SAVINGS)
    before = snapshot(model)
    base = host.sample(model, steps=6, height=128, width=128)
    for row in rows:
        if row.missing:
            assert row.missing.startswith("not available"), row.missing
            continue
        patched = row.build(model) if row.build else model
        steps = max(1, round(6 * row.steps))
        out = host.sample(patched, steps=steps, height=128, width=128)
        assert out.shape == base.shape and torch.isfinite(out).all(), row.name
        if row.build is None and row.steps == 1.0:
            assert torch.equal(out, base), row.name
        elif row.build is not None and not row.name.startswith("ComfyUI"):
            assert not torch.equal(out, base), f"{row.name}: the patch changed nothing"
    assert_same_snapshot(before, snapshot(model))

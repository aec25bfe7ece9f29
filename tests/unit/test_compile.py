"""torch.compile sees a few token counts, not one per step: a 10-step run of the reference DiT whose blocks
are compiled (dynamo with a counting backend, no dynamic shapes: every new shape is a new graph, as with
`dynamic=False` or CUDA graphs) compiles each block kind once per token bucket the method produces, and
for nothing else (the methods' attention hooks run inside the compiled blocks without guarding them on
their state)."""
from __future__ import annotations

import collections

import pytest
import torch

from kernels import cat, density, sdtm, token_ops
from kernels.schedule import TokenRatioSchedule
from conftest import step_plan
from tools import reference_dit as R

STEPS = 10
CONFIG = R.DiTConfig(image_size=32)  # 16 x 16 = 256 image tokens, 2 double + 4 single blocks


def compiled_run(method) -> collections.Counter:
    """Graphs compiled per block kind (double, single) over one 10-step run with `method`."""
    import torch._dynamo
    graphs = collections.Counter()

    def counting(kind):
        def backend(gm, example_inputs):
            graphs[kind] += 1
            return gm.forward
        return backend

    model = R.ReferenceDiT(CONFIG).init_weights(0).eval()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(cache_size_limit=64, automatic_dynamic_shapes=False):
        for kind, blocks in (("double", model.double_blocks), ("single", model.single_blocks)):
            backend = counting(kind)  # one backend per kind: the blocks of a kind share their graphs
            for i in range(len(blocks)):
                blocks[i] = torch.compile(blocks[i], backend=backend, dynamic=False)
        to = R.method_options(method, model, "compile") if method is not None else None
        R.sample(model, [0], steps=STEPS, cfg=3.0, transformer_options=to)
    torch._dynamo.reset()
    return graphs


def progresses():
    return [i / STEPS for i in range(STEPS)]  # the reference sampler's sigma is 1 - progress


def sdtm_counts(method: sdtm.SDTM, n: int, num_blocks: int) -> set:
    """Image-token counts SDTM's blocks run on in the run (n: unmerged), from its ratio and the buckets."""
    out = {n}
    for p in progresses():
        for b in range(num_blocks):
            r = min(token_ops.bucket_ratio(method.ratio(b, num_blocks, p)), method._top)  # CRA's cosine moves
            removed = int(r * n) // 3 * 3  # whole 2x2 windows: 3 tokens each
            out.add(n - removed)
    return out


@pytest.fixture(scope="module")
def unpatched_graphs(one_torch_thread):
    return compiled_run(None)


def test_unpatched_compiles_each_block_kind_once(unpatched_graphs):
    assert unpatched_graphs == {"double": 1, "single": 1}


def test_sdtm_compiles_once_per_bucket_not_once_per_step(one_torch_thread):
    method = sdtm.SDTM(sdtm.SDTMConfig(**sdtm.EVERY_STEP_MERGED))
    counts = sdtm_counts(method, 256, 6)
    assert 2 <= len(counts) <= 5, counts  # the cosine ratio spans a few buckets of 1/20
    graphs = compiled_run(method)
    assert graphs == {"double": len(counts), "single": len(counts)}, (graphs, counts)


def test_without_buckets_sdtm_would_recompile_at_every_step(one_torch_thread, monkeypatch):
    """The check above can fail: with a bucket per token, every merged step is a new shape."""
    config = sdtm.SDTMConfig(**sdtm.EVERY_STEP_MERGED)
    bucketed = len(sdtm_counts(sdtm.SDTM(config), 256, 6))
    monkeypatch.setattr(token_ops, "RATIO_BUCKETS", 10 ** 6)
    graphs = compiled_run(sdtm.SDTM(config))
    merged_steps = sum(p >= config.start_percent for p in progresses())
    assert graphs["double"] == merged_steps + 1 > bucketed, (graphs, bucketed)


def test_density_compiles_once_per_window(one_torch_thread):
    method = density.DensitySchedule(density.DensityConfig())
    windows = {method.window(b, 6, p) for p in progresses() for b in range(6)}
    graphs = compiled_run(method)
    assert graphs == {"double": len(windows), "single": len(windows)}, (graphs, windows)


def test_cat_compiles_once_for_full_and_once_for_pruned_steps(one_torch_thread):
    method = cat.CATPruning(cat.CATConfig())
    counts = set(step_plan(method, progresses(), 256, 6))
    assert len(counts) == 2
    graphs = compiled_run(method)
    assert graphs == {"double": 2, "single": 2}, graphs


def test_scheduled_ratios_take_their_counts_from_the_buckets():
    """A schedule's ratio that changes with progress gives CAT and SDTM counts on the 1/20 grid, so a run of
    any length meets at most RATIO_BUCKETS token counts; a ratio constant through the run is used as it is."""
    sched = TokenRatioSchedule(depth=[0.0, 1.0], progress=[0.0, 1.0], ratios=[[0.9, 0.3], [0.7, 0.1]])
    n_img = 256
    grid = {n_img - int(j / token_ops.RATIO_BUCKETS * n_img) for j in range(token_ops.RATIO_BUCKETS + 1)}
    ps = [i / 97 for i in range(97)]
    kept = {cat.CATPruning(cat.CATConfig(), schedule=sched).n_keep(n_img, p, 6) for p in ps}
    assert kept <= grid and 1 < len(kept) <= token_ops.RATIO_BUCKETS, kept
    m = sdtm.SDTM(sdtm.SDTMConfig(**{**sdtm.EVERY_STEP_MERGED, "start_percent": 0.0}), schedule=sched)
    removed = set()
    for p in ps:
        for b in range(6):
            plan = m.plan(torch.randn(1, n_img, 8), (16, 16), b, 6, p)
            removed.add(0 if plan is None else n_img - plan.n_out)
    assert 1 < len(removed) <= token_ops.RATIO_BUCKETS + 1, removed
    steady = TokenRatioSchedule(depth=[0.0, 1.0], progress=[0.0, 1.0], ratios=[[0.33, 0.33], [0.41, 0.41]])
    assert not steady.varies_with_progress() and sched.varies_with_progress()
    assert cat.CATPruning(cat.CATConfig(), schedule=steady).ratio(0.5, 2) == pytest.approx(0.37)
    assert cat.CATPruning(cat.CATConfig(ratio=0.93)).ratio(0.5) == 0.93
    fixed = sdtm.SDTM(sdtm.SDTMConfig(**{**sdtm.EVERY_STEP_MERGED, "ratio": 0.33, "ratio_adjust": False,
                                         "start_percent": 0.0}))
    assert n_img - fixed.plan(torch.randn(1, n_img, 8), (16, 16), 0, 6, 0.5).n_out == int(0.33 * n_img) // 3 * 3

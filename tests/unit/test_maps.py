"""Core tests of the token-map recorder store, attention probe and torch rendering (no ComfyUI)."""
from __future__ import annotations

import math

import pytest
import torch

from kernels import maps, runtime
from kernels.families import flux_family
from kernels.flops import block_flops
from kernels.maps_render import colormap, group_colours, legend, overlay, text_mask
from kernels.token_ops import plan_from_targets

FLUX_DEV = flux_family("Flux", 19, 38)  # 57 blocks


def test_parse_selection():
    assert maps.parse_selection("all", 4) == [0, 1, 2, 3]
    assert maps.parse_selection("none", 4) == []
    assert maps.parse_selection("first, middle, last", 7) == [0, 3, 6]
    assert maps.parse_selection("0, 2..4, -1", 10) == [0, 2, 3, 4, 9]
    assert maps.parse_selection("-3..-1", 10) == [7, 8, 9]
    assert maps.parse_selection("first", 0) == []
    assert maps.parse_selection("5", None) is None  # syntax only
    for bad in ("", "every", "1..x", "1.5"):
        with pytest.raises(ValueError):
            maps.parse_selection(bad, None)
    with pytest.raises(ValueError, match="out of range"):
        maps.parse_selection("10", 10)
    with pytest.raises(ValueError, match="out of range"):
        maps.parse_selection("-11", 10)


def _sigmas(steps):
    return [1.0 - i / steps for i in range(steps + 1)]


def test_budget_of_a_full_flux_run_at_1024():
    """50 steps x all 57 blocks of Flux at 1024^2 (4096 tokens), every map kind, fits the default budget."""
    n = 64 * 64
    need = maps.estimate_bytes(n, 50, 57, 50, 57)
    assert need == 50 * 57 * n * (2 + 1) + 50 * 57 * n * 2 * 2
    assert abs(need / 2 ** 20 - 77.93) < 0.01
    config = maps.RecorderConfig(attention_steps="all", attention_blocks="all")
    store = maps.TokenMapStore(config, FLUX_DEV)
    store.begin_run(_sigmas(50), (64, 64))
    assert store.refused is None and need <= config.max_bytes
    # A budget below the analytic worst case is refused before the run, with the numbers and the way out.
    small = maps.TokenMapStore(maps.RecorderConfig(attention_steps="all", attention_blocks="all",
                                                   max_bytes=need - 1), FLUX_DEV)
    small.begin_run(_sigmas(50), (64, 64))
    assert small.refused and "77.9 MiB" in small.refused and "max_megabytes" in small.refused
    assert not small.wants_redundancy(0, 1) and not small.wants_attention(0, 0)


def test_video_budget_is_refused_at_defaults():
    """Wan 720p, 81 frames: 21 x 45 x 80 tokens, int32 group maps: far above 256 MiB -> refused."""
    store = maps.TokenMapStore(maps.RecorderConfig(), flux_family("Wan-like", 0, 40))
    store.begin_run(_sigmas(50), (21, 45, 80))
    assert maps.group_bytes(21 * 45 * 80) == 4 and store.refused


def test_store_never_exceeds_budget_at_runtime():
    store = maps.TokenMapStore(maps.RecorderConfig(max_bytes=100), FLUX_DEV)
    store.begin_run(_sigmas(1), (2, 2))  # 4 tokens: fits the estimate for few blocks only
    store.refused = None
    for b in range(20):
        store.put("group", 0, b, torch.zeros(4, dtype=torch.int16))
    assert store.bytes_used <= 100 and store.truncated


def test_step_of_maps_sigma_to_nearest_step():
    store = maps.TokenMapStore(maps.RecorderConfig(), FLUX_DEV)
    store.begin_run([1.0, 0.75, 0.5, 0.25, 0.0], (4, 4))
    assert [store.step_of(s) for s in (1.0, 0.76, 0.5, 0.24, 0.01)] == [0, 1, 2, 3, 3]
    assert store.n_steps == 4


def test_the_store_listens_to_the_first_conditional_row_of_a_call():
    store = maps.TokenMapStore(maps.RecorderConfig(), flux_family("Flux", 2, 1))
    store.begin_run(_sigmas(4), (2, 2))
    sigma = _sigmas(4)[1]

    def call(rows):
        return runtime.CallInfo(grid=(2, 2), n_img=4, n_txt=3, progress=0.25, sigma=sigma, rows=rows)

    listener = store.begin_call(call((("u", 1, 0), ("u", 0, 0), ("u", 0, 1))))
    assert (listener.row, listener.step, listener.n_txt) == (1, 1, 3) and store.progress == {1: 0.25}
    assert store.begin_call(call((("u", 1, 0),))) is None  # only the unconditional row: nothing recorded
    assert store.begin_call(call(())).row == 0  # a host that names no rows (the reference model)


def test_a_call_listener_records_the_plans_and_masks_it_hears():
    plan = plan_from_targets(torch.tensor([[0, 0, 2, 2]]), 2)  # two groups of 2
    store = maps.TokenMapStore(maps.RecorderConfig(), flux_family("Flux", 2, 1))
    store.begin_run(_sigmas(2), (2, 2))
    call = maps.ActiveCall(store, 1, 0, 4, 0)
    call.plan(1, plan)
    call.computed_mask(2, torch.tensor([[1, 0, 1, 1]]))
    assert set(store.maps) == {("group", 1, 1), ("computed", 1, 2)}
    assert torch.equal(store.maps[("group", 1, 1)], plan.assign[0].to(torch.int16))
    assert store.map("merge_size", 1, 1).tolist() == [2, 2, 2, 2]
    assert store.map("merge_groups", 1, 1).tolist() == [1, 1, 2, 2]
    assert store.map("computed", 1, 1).tolist() == [0.5, 0.5, 0.5, 0.5]
    assert store.map("computed", 1, 2).tolist() == [1, 0, 1, 1]
    assert store.map("merge_size", 1, 0) is None  # nothing recorded there


def test_received_attention_matches_softmax_with_mask():
    gen = torch.Generator().manual_seed(0)
    h, L, d, offset, n = 3, 10, 8, 4, 6
    q, k = torch.randn(h, L, d, generator=gen), torch.randn(h, L, d, generator=gen)
    bias = torch.randn(1, 1, 1, L, generator=gen)
    p = (q @ k.transpose(1, 2) / math.sqrt(d) + bias[0]).softmax(-1)
    qidx = torch.tensor([0, 1, 5, 9])
    got = maps._received(q, k, qidx, bias, 0, offset, n, head_chunk=2)
    assert torch.allclose(got, p[:, qidx, offset:offset + n].mean((0, 1)), atol=1e-6)
    # A boolean mask that hides the last key behaves like -inf.
    keep = torch.ones(L, dtype=torch.bool)
    keep[-1] = False
    got = maps._received(q, k, qidx, keep[None, None, None, :], 0, offset, n)
    p2 = (q @ k.transpose(1, 2) / math.sqrt(d)).masked_fill(~keep, float("-inf")).softmax(-1)
    assert torch.allclose(got, p2[:, qidx, offset:offset + n].mean((0, 1)), atol=1e-6)
    assert float(got[-1]) == 0.0


def test_strided_queries():
    assert maps._strided(5, 10, "cpu").tolist() == [0, 1, 2, 3, 4]
    s = maps._strided(1000, 4, "cpu").tolist()
    assert s[0] == 0 and s[-1] == 999 and len(s) == 4


def test_block_flops_and_summary():
    assert block_flops(10, 4) == 24 * 16 * 10 + 4 * 4 * 100
    store = maps.TokenMapStore(maps.RecorderConfig(), flux_family("Flux", 1, 1))
    store.begin_run(_sigmas(2), (4, 4))
    store.counts[(0, 0)] = maps.BlockCount(16, 16, 4, 8)
    store.counts[(0, 1)] = maps.BlockCount(16, 8, 4, 8)
    store.progress[0] = 0.0
    store.end_run()
    head, lines = maps.run_summary(store)
    assert "tokens saved 25.0%" in head and len(lines) == 1
    f_full = 2 * block_flops(20, 8)
    saved = 1 - (block_flops(20, 8) + block_flops(12, 8)) / f_full
    assert f"FLOPs saved {100 * saved:.1f}%" in head


def test_colormap_and_group_colours():
    c = colormap(torch.linspace(0, 1, 11))
    assert c.shape == (11, 3) and float(c.min()) >= 0 and float(c.max()) <= 1
    assert (c[1:] - c[:-1]).abs().sum(-1).min() > 0  # strictly changing along the ramp
    g = group_colours(torch.tensor([0, 1, 2, 3]))
    assert torch.equal(g[0], torch.zeros(3)) and len({tuple(x.tolist()) for x in g[1:]}) == 3


def test_text_and_legend():
    m = text_mask("AB 1", 2)
    assert m.shape == (10, 4 * 4 * 2) and set(m.unique().tolist()) <= {0.0, 1.0} and m.sum() > 0
    assert text_mask(" ", 1).sum() == 0
    strip = legend(200, "STEP 1/4", "0", "1", discrete=False)
    assert strip.shape[1] == 200 and strip.shape[2] == 3 and float(strip.max()) <= 1


def test_overlay_shapes_and_opacity():
    img = torch.rand(32, 48, 3)
    v = torch.rand(4, 6)
    out = overlay(img, v, "T", 0.0, "attention_text")
    assert out.shape[0] > 32 and out.shape[1:] == (48, 3)
    assert torch.allclose(out[:32], img)  # opacity 0 keeps the image
    full = overlay(img, v, "T", 1.0, "attention_text")
    assert torch.allclose(full[:8, :8], colormap(v[0, 0] / v.max()).expand(8, 8, 3), atol=1e-6)
    groups = overlay(img, torch.tensor([[0.0, 1, 1, 0, 0, 0]] * 4), "G", 1.0, "merge_groups")
    assert torch.allclose(groups[:32, :8], img[:, :8])  # unmerged tokens stay clear
    assert not torch.allclose(groups[:32, 8:16], img[:, 8:16])

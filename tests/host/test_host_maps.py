"""Host tests: Token Map Recorder / Overlay on tiny random models of ComfyUI's own Flux class.

Every test takes the `host` fixture (skips with the reason when no ComfyUI is found).
Tiny Flux: 2 double + 2 single blocks, 128x128 px -> 8x8 = 64 image tokens, CFG 3 (cond and
uncond in one batch), 4 euler steps.
"""
from __future__ import annotations

import asyncio
import importlib
import json
import logging

import pytest
import torch

STEPS = 4
SIZE = 128
N_TOKENS = (SIZE // 16) ** 2


@pytest.fixture(scope="module")
def nodes(host):
    return host.pack_nodes()


@pytest.fixture(scope="module")
def maps_mods(host):
    import importlib
    host.load_pack()
    return (importlib.import_module(host.PACK_NAME + ".kernels.maps"),
            importlib.import_module(host.PACK_NAME + ".nodes.maps_nodes"),
            importlib.import_module(host.PACK_NAME + ".nodes.maps_route"))


def recorder_defaults(node, **kw):
    d = {i.id: i.default for i in node.define_schema().inputs if i.id != "model"}
    d.update(kw)
    return d


# Merging from the first step, first and last block whole: every step shows merged and unmerged blocks.
FROM_FIRST_STEP = dict(start_percent=0.0, skip_first_blocks=1, skip_last_blocks=1)


def sdtm(host, nodes, model, **overrides):
    (out,) = host.run_node(nodes["SDTMPatchModel"], model=model,
                           **host.every_step_inputs(nodes["SDTMPatchModel"], **overrides))
    return out


def record(host, nodes, model, **kw):
    (out,) = host.run_node(nodes["TokenMapRecorder"], model=model, **recorder_defaults(nodes["TokenMapRecorder"], **kw))
    return out


def run(host, model):
    return host.sample(model, steps=STEPS, height=SIZE, width=SIZE, cfg=3.0)


def patch_with(host, nodes, node_id, model):
    """`node_id` at its widget defaults (optional inputs left out)."""
    node = nodes[node_id]
    d = host.node_inputs(node)
    (out,) = host.run_node(node, model=model, **d)
    return out


@pytest.mark.parametrize("patch", [None, "SDTMPatchModel", "CATPruningPatchModel", "TokenDensityPatchModel"],
                         ids=["unpatched", "sdtm", "cat", "density"])
def test_recording_never_changes_the_latent(host, nodes, maps_mods, patch, caplog):
    base = host.tiny_flux(seed=0)
    model = patch_with(host, nodes, patch, base) if patch else base
    reference = host.sample(model, steps=6, height=SIZE, width=SIZE, cfg=3.0)
    recorded = record(host, nodes, model, attention_steps="all", attention_blocks="all")
    with caplog.at_level(logging.WARNING, logger="token_reduction"):
        out = host.sample(recorded, steps=6, height=SIZE, width=SIZE, cfg=3.0)
    assert torch.equal(out, reference), "the recorder changed the generated latent"
    assert not [r for r in caplog.records if "Token Map Recorder" in r.getMessage()], "a probe failed"
    store = maps_mods[1].recorder_store(recorded)
    n_blocks = store.family.num_blocks
    reduced = {p for p, c in store.counts.items() if c.n_computed < c.n_img}
    assert bool(reduced) == (patch is not None), reduced
    # Every block of every step has its attention maps, reduced blocks included (CAT keeps every
    # key; SDTM and the density node report their merge / pooling plans).
    everything = {(s, b) for s in range(6) for b in range(n_blocks)}
    assert {k[1:] for k in store.maps if k[0] == "attention_text"} == everything
    if patch in ("SDTMPatchModel", "TokenDensityPatchModel"):
        assert any(k[0] == "group" for k in store.maps), "no merge plan was recorded"
    if patch == "CATPruningPatchModel":
        # CAT reports which tokens it computed: in every reduced block the map's ones are exactly the
        # computed tokens the block counted; elsewhere every token was computed.
        computed = {k[1:]: m for k, m in store.maps.items() if k[0] == "computed"}
        assert set(computed) == everything, "CAT's computed/cached map is missing for some step and block"
        for key, m in computed.items():
            assert int(m.sum()) == store.counts[key].n_computed, key
        assert any(int(computed[k].sum()) < m.numel() for k, m in computed.items() if k in reduced)


def test_map_shapes_and_ranges(host, nodes, maps_mods):
    maps = maps_mods[0]
    model = record(host, nodes, sdtm(host, nodes, host.tiny_flux(seed=0), **FROM_FIRST_STEP),
                   attention_steps="all", attention_blocks="all")
    run(host, model)
    store = maps_mods[1].recorder_store(model)
    assert store.grid == (SIZE // 16, SIZE // 16) and store.n_steps == STEPS
    n_blocks = store.family.num_blocks
    assert set(store.counts) == {(s, b) for s in range(STEPS) for b in range(n_blocks)}
    merged_blocks, merged = set(), set()
    for (kind, step, block), m in store.maps.items():
        assert m.device.type == "cpu" and m.shape == (N_TOKENS,), (kind, m.shape)
        if kind == "group":
            assert m.dtype == torch.int16
            g = m.long()
            n_groups = int(g.max()) + 1
            assert int(g.min()) == 0 and torch.unique(g).numel() == n_groups  # groups 0..M-1, none empty
            assert n_groups == store.counts[(step, block)].n_computed < N_TOKENS
            merged_blocks.add(block)
            merged.add((step, block))
        else:
            assert m.dtype == torch.float16
            v = m.float()
            assert bool((v >= 0).all()) and bool((v <= 1).all())
            assert float(v.sum()) <= 1.0 + 1e-2  # a share of each query's attention
            assert float(v.sum()) > 0.05        # image keys get a real share of it
    # FROM_FIRST_STEP skips the first and last block; the first call's double blocks run whole until its
    # single blocks have shown the text order (kernels.families.TextOrder).
    assert merged_blocks == set(range(1, n_blocks - 1))
    assert {b for s, b in merged if s == 0} == set(range(2, n_blocks - 1))
    for kind in maps.KINDS:
        for step in range(STEPS):
            for block in range(n_blocks):
                v = store.map(kind, step, block)
                assert v is not None and v.shape == (N_TOKENS,), (kind, step, block)
                if kind == "merge_size":
                    # Whole numbers >= 1; a detail-stage destination may take more than one window's worth.
                    assert bool((v >= 1).all()) and bool((v == v.round()).all()) and float(v.max()) <= N_TOKENS
                    assert bool((v == 1).all()) == ((step, block) not in merged)
                if kind == "computed":
                    assert bool((v > 0).all()) and bool((v <= 1).all())
                    assert abs(float(v.sum()) - store.counts[(step, block)].n_computed) < 1e-3


def _qk_spy(model):
    """A clone whose double block 0 keeps the q, k of its (first) joint attention in `seen["qk"]`, then
    chains to whatever attention override is there."""
    seen = {}

    def block0(args, extra):
        to = dict(args["transformer_options"])
        previous = to.get("optimized_attention_override")

        def spy(func, *a, **kw):
            seen.setdefault("qk", (a[0].detach().clone(), a[1].detach().clone()))
            return previous(func, *a, **kw) if previous else func(*a, **kw)

        to["optimized_attention_override"] = spy
        return extra["original_block"]({**args, "transformer_options": to})

    probe = model.clone()
    probe.set_model_patch_replace(block0, "dit", "double_block", 0)
    return probe, seen


def test_attention_map_matches_direct_computation(host, nodes, maps_mods):
    """With every query sampled, the unmerged map equals softmax(q k^T) averaged over the image queries."""
    maps = maps_mods[0]
    model = host.tiny_flux(seed=0)
    probe, seen = _qk_spy(model)
    recorded = record(host, nodes, probe, attention_steps="0", attention_blocks="0", queries=4096)
    host.sample(recorded, steps=1, height=SIZE, width=SIZE, cfg=1.0)
    q, k = seen["qk"]
    n_txt = q.shape[2] - N_TOKENS
    p = (q[0].float() @ k[0].float().transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1)  # (H, L, L)
    want_img = p[:, n_txt:, n_txt:].mean((0, 1))
    want_txt = p[:, :n_txt, n_txt:].mean((0, 1))
    store = maps_mods[1].recorder_store(recorded)
    assert torch.allclose(store.maps[("attention_image", 0, 0)].float(), want_img, atol=2e-3, rtol=1e-2)
    assert torch.allclose(store.maps[("attention_text", 0, 0)].float(), want_txt, atol=2e-3, rtol=1e-2)
    assert set(k[0] for k in store.maps) == {"attention_image", "attention_text"}
    assert maps.KINDS  # the module is the pack's


def test_budget_refusal_records_nothing(host, nodes, maps_mods, caplog):
    maps = maps_mods[0]
    model = record(host, nodes, sdtm(host, nodes, host.tiny_flux(seed=0)), attention_steps="all",
                   attention_blocks="all")
    store = maps_mods[1].recorder_store(model)
    need = maps.estimate_bytes(N_TOKENS, STEPS, 4, STEPS, 4)
    store.config.max_bytes = need - 1
    with caplog.at_level(logging.WARNING, logger="token_reduction"):
        out = run(host, model)
    assert store.refused and "records no maps" in store.refused and "max_megabytes" in store.refused
    assert any("records no maps" in r.getMessage() for r in caplog.records)
    assert store.maps == {} and store.counts == {}
    assert torch.isfinite(out).all()
    store.config.max_bytes = need  # exactly the analytic worst case: accepted, and never exceeded
    run(host, model)
    assert store.refused is None and not store.truncated and 0 < store.bytes_used <= need


def test_recorder_shared_by_clones_and_reset_per_run(host, nodes, maps_mods):
    model = record(host, nodes, host.tiny_flux(seed=0))
    store = maps_mods[1].recorder_store(model)
    later = model.clone()  # e.g. a LoRA node after the recorder
    assert maps_mods[1].recorder_store(later) is store
    run(host, later)
    first_id, first_maps = store.run_id, dict(store.maps)
    host.sample(later, steps=2, height=SIZE, width=SIZE)
    assert store.run_id == first_id + 1 and store.n_steps == 2
    assert all(k[1] < 2 for k in store.maps) and first_maps


def test_recorder_rejects_bad_input(host, nodes):
    with pytest.raises(ValueError, match="attention_blocks.*out of range"):
        record(host, nodes, host.tiny_flux(seed=0), attention_blocks="0, 9")
    with pytest.raises(ValueError, match="steps.*not an index"):
        record(host, nodes, host.tiny_flux(seed=0), steps="every other")


def test_overlay_node_draws_and_reports(host, nodes, maps_mods):
    model = record(host, nodes, sdtm(host, nodes, host.tiny_flux(seed=0)))
    run(host, model)
    image = torch.rand(1, SIZE, SIZE, 3)
    node = nodes["TokenMapOverlay"]
    out = node.execute(model=model, image=image, kind="merge_size", steps="all", blocks="1, 2", opacity=0.6,
                       max_images=16)
    overlays, stats = out.args
    assert overlays.shape[0] == STEPS * 2 and overlays.shape[1] > SIZE and overlays.shape[2] == SIZE
    assert float(overlays.min()) >= 0 and float(overlays.max()) <= 1
    assert not torch.equal(overlays[0, :SIZE], image[0])  # the map is drawn over the image
    assert stats.startswith("Token maps, last run: tokens saved") and "FLOPs saved" in stats and "s/step" in stats
    assert len(stats.splitlines()) == 1 + STEPS
    ui = out.ui
    map_id = ui["token_maps"][0]["id"]
    assert maps_mods[2].lookup(map_id) is not None
    capped = node.execute(model=model, image=image, kind="attention_text", steps="all", blocks="all", opacity=1.0,
                          max_images=3).args[0]
    assert capped.shape[0] == 3
    with pytest.raises(ValueError, match="no Token Map Recorder"):
        node.execute(model=host.tiny_flux(seed=0), image=image, kind="merge_size", steps="all", blocks="all",
                     opacity=0.5, max_images=4)


def test_route_serves_issued_ids_and_rejects_bad_requests(host, nodes, maps_mods):
    from aiohttp.test_utils import make_mocked_request
    route = maps_mods[2]
    model = record(host, nodes, sdtm(host, nodes, host.tiny_flux(seed=0), **FROM_FIRST_STEP))
    run(host, model)
    store = maps_mods[1].recorder_store(model)
    map_id = route.issue(store, torch.rand(1, SIZE, SIZE, 3), "stats")

    def call(handler, path, match):
        req = make_mocked_request("GET", path, match_info=match)
        resp = asyncio.run(handler(req))
        return resp.status, json.loads(resp.body)

    status, meta = call(route.handle_meta, f"{route.ROUTE}/{map_id}", {"map_id": map_id})
    assert status == 200 and meta["grid"] == [8, 8] and meta["steps"] == STEPS and len(meta["blocks"]) == 4
    assert meta["image"]["width"] == SIZE and meta["recorded"]["merge_size"]
    # block 2, the first single-stream block: merged from the first step (double blocks wait for the text order)
    status, body = call(route.handle_map, f"{route.ROUTE}/{map_id}/map?kind=merge_size&step=0&block=2",
                        {"map_id": map_id})
    assert status == 200 and len(body["values"]) == N_TOKENS and body["max"] > 1
    # Attention is recorded at the first, middle and last step only: step 1 has none (an empty answer).
    status, body = call(route.handle_map, f"{route.ROUTE}/{map_id}/map?kind=attention_text&step=1&block=0",
                        {"map_id": map_id})
    assert status == 200 and body["values"] is None and "attention_steps" in body["reason"]  # and says why
    assert meta["not_recorded"]["attention_text"] == body["reason"] and set(meta["kind_help"]) == set(meta["kinds"])
    bad = [
        (route.handle_meta, "../../etc/passwd", {}),
        (route.handle_meta, "0123456789abcdef", {}),                    # well-formed, never issued
        (route.handle_meta, map_id, {"x": "1"}),
        (route.handle_map, map_id, {"kind": "nope", "step": "0", "block": "0"}),
        (route.handle_map, map_id, {"kind": "merge_size", "step": "x", "block": "0"}),
        (route.handle_map, map_id, {"kind": "merge_size", "step": str(STEPS), "block": "0"}),
        (route.handle_map, map_id, {"kind": "merge_size", "step": "0", "block": "-1"}),
        (route.handle_map, map_id, {"kind": "merge_size", "step": "0", "block": "99999999"}),
        (route.handle_map, map_id, {"kind": "merge_size", "step": "0"}),
        (route.handle_map, map_id, {"kind": "merge_size", "step": "0", "block": "0", "path": "/tmp"}),
    ]
    from urllib.parse import urlencode
    for handler, mid, query in bad:
        path = f"{route.ROUTE}/{mid}" + ("/map" if handler is route.handle_map else "")
        status, body = call(handler, path + ("?" + urlencode(query) if query else ""), {"map_id": mid})
        assert 400 <= status < 500 and "error" in body, (mid, query, status)


def test_schedule_route_builds_the_node_schedule_and_rejects_bad_values(host, maps_mods):
    from urllib.parse import urlencode

    from aiohttp.test_utils import make_mocked_request
    import importlib
    presets = importlib.import_module(host.PACK_NAME + ".kernels.schedule_presets")
    route = maps_mods[2]

    def call(query):
        req = make_mocked_request("GET", f"{route.SCHEDULE_ROUTE}?{urlencode(query)}")
        resp = asyncio.run(route.handle_schedule(req))
        return resp.status, json.loads(resp.body)

    good = {"preset": "diffcr_like", "ratio": "0.5", "end_scale": "0.25", "switch_percent": "0.4"}
    status, body = call(good)
    assert status == 200 and len(body["ratios"]) == route.SCHEDULE_GRID
    want = presets.build_schedule("diffcr_like", 0.5, 0.25, 0.4)
    for i in (0, 10, 32):
        for j in (0, 16, 32):
            d, p = body["depth"][i], body["progress"][j]
            assert abs(body["ratios"][i][j] - want.ratio(d, p)) < 1e-4
    assert max(max(r) for r in body["ratios"]) > 0.3
    for bad in ({**good, "preset": "nope"}, {**good, "ratio": "x"}, {**good, "ratio": "."}, {**good, "ratio": "2"},
                {**good, "end_scale": "-1"}, {**good, "file": "/etc/passwd"}, {**good, "progress_curve": "0:9"},
                {**good, "schedule_json": "{not json"}, {**good, "depth_curve": "x" * 5000},
                {k: v for k, v in good.items() if k != "ratio"}):
        status, body = call(bad)
        assert 400 <= status < 500 and "error" in body, (bad, status)


def test_video_latents_record_per_frame_maps_and_overlay_every_frame(host, nodes, maps_mods):
    """Tiny Wan 2.1 (cross-attention to text): 3 latent frames of 8x8 px -> a 3x4x4 token grid."""
    model = record(host, nodes, sdtm(host, nodes, host.tiny_wan(seed=0, layers=4)), attention_steps="all",
                   attention_blocks="all")
    latent = torch.zeros(1, 16, 3, 8, 8)
    reference = host.sample(sdtm(host, nodes, host.tiny_wan(seed=0, layers=4)), steps=2, latent=latent)
    out = host.sample(model, steps=2, latent=latent)
    assert torch.equal(out, reference)
    store = maps_mods[1].recorder_store(model)
    assert store.grid == (3, 4, 4)
    kinds = {k[0] for k in store.maps}
    assert "attention_image" in kinds and "group" in kinds
    assert "attention_text" not in kinds  # Wan reads the text by cross-attention: no text queries to average
    frames = torch.rand(9, 64, 64, 3)  # the VAE's 4x temporal upsampling: 4 * (3 - 1) + 1 frames
    overlays, stats = nodes["TokenMapOverlay"].execute(model=model, image=frames, kind="merge_size", steps="0",
                                                       blocks="1", opacity=1.0, max_images=64).args
    assert overlays.shape[0] == 9 and overlays.shape[2] == 64
    sizes = store.map("merge_size", 0, 1).reshape(3, 4, 4)
    render = importlib.import_module(host.PACK_NAME + ".kernels.maps_render")
    # Opacity 1 shows the colours alone, on one scale for the whole clip: frame f shows latent
    # frame round(f * 2 / 8); sample every token's centre (16 px per token).
    for f in range(9):
        t = round(f * 2 / 8)
        got = overlays[f, 8:64:16, 8:64:16]
        assert torch.allclose(got, render.colormap(sizes[t] / sizes.max()), atol=1e-5), f


def test_hunyuan_video_maps_read_text_after_the_image(host, nodes, maps_mods):
    """HunyuanVideo's joint attention is [image, text]: with every query sampled, the image map is the
    attention image queries give image keys and the text map the attention the text queries (which come
    after the image) give them; recording under SDTM leaves the latent bit-identical."""
    model = host.tiny_hunyuan_video(seed=0)
    latent = torch.zeros(1, 16, 2, 8, 8)
    n_img = 2 * 4 * 4
    probe, seen = _qk_spy(model)
    recorded = record(host, nodes, probe, attention_steps="0", attention_blocks="0", queries=4096)
    host.sample(recorded, steps=1, cfg=1.0, latent=latent)
    q, k = seen["qk"]
    p = (q[0].float() @ k[0].float().transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1)  # (H, L, L)
    store = maps_mods[1].recorder_store(recorded)
    assert store.grid == (2, 4, 4)
    assert torch.allclose(store.maps[("attention_image", 0, 0)].float(), p[:, :n_img, :n_img].mean((0, 1)),
                          atol=2e-3, rtol=1e-2)
    assert torch.allclose(store.maps[("attention_text", 0, 0)].float(), p[:, n_img:, :n_img].mean((0, 1)),
                          atol=2e-3, rtol=1e-2)
    merged = record(host, nodes, sdtm(host, nodes, model), attention_steps="all", attention_blocks="all")
    assert torch.equal(host.sample(merged, steps=2, latent=latent),
                       host.sample(sdtm(host, nodes, model), steps=2, latent=latent))
    kinds = {key[0] for key in maps_mods[1].recorder_store(merged).maps}
    assert {"attention_image", "attention_text", "group"} <= kinds, kinds


def test_lumina2_maps_through_patched_layer_forwards(host, nodes, maps_mods):
    """Lumina 2 has no block hook: the recorder reaches its layers through the same per-layer forward
    patches as the methods. Recording under SDTM leaves the latent bit-identical; groups, image and
    caption attention are recorded on the (H, W) grid."""
    cond = {"attention_mask": torch.ones(1, 16, dtype=torch.long)}
    latent = torch.zeros(1, 16, 16, 12)
    model = host.tiny_lumina2(seed=0)
    merged = record(host, nodes, sdtm(host, nodes, model, start_percent=0.0), attention_steps="all",
                    attention_blocks="all")
    out = host.sample(merged, steps=2, latent=latent, cond_extra=cond)
    assert torch.equal(out, host.sample(sdtm(host, nodes, model, start_percent=0.0), steps=2, latent=latent,
                                        cond_extra=cond))
    store = maps_mods[1].recorder_store(merged)
    assert store.grid == (8, 6)
    kinds = {key[0] for key in store.maps}
    assert {"attention_image", "attention_text", "group"} <= kinds, kinds

"""What a person sees of the patch nodes: presets, advanced inputs, and what a run did shown on the node.

Every test takes the `host` fixture and skips, with the reason, without a ComfyUI checkout.
"""
import importlib
import sys
import types

import pytest
import torch

PATCH_NODES = {"SDTMPatchModel": "sdtm", "TokenDensityPatchModel": "density", "CATPruningPatchModel": "cat"}


@pytest.mark.parametrize("node_id", list(PATCH_NODES))
def test_presets_set_the_settings_and_custom_uses_the_widgets(host, node_id):
    node = host.pack_nodes()[node_id]
    kernel = importlib.import_module(f"{host.PACK_NAME}.kernels.{PATCH_NODES[node_id]}")
    config_cls = type(node.config("balanced"))
    assert node.config("balanced") == config_cls(), "balanced is the defaults"
    widgets = {k: v for k, v in host.node_inputs(node).items() if k != "preset"}
    for name, overrides in kernel.PRESETS.items():
        assert node.config(name, **widgets) == config_cls(**overrides)
    changed = dict(widgets, start_percent=0.55)
    assert node.config("custom", **changed).start_percent == 0.55
    assert node.config("fast", **changed).start_percent == config_cls(**kernel.PRESETS["fast"]).start_percent
    with pytest.raises(ValueError, match="unknown preset 'turbo'; choose one of"):
        node.config("turbo", **widgets)


@pytest.mark.parametrize("node_id", list(PATCH_NODES))
def test_expert_inputs_are_advanced_and_the_rest_are_not(host, node_id):
    for inp in host.pack_nodes()[node_id].define_schema().inputs:
        advanced = inp.extra_dict.get("advanced", False)
        assert advanced == (inp.id not in ("model", "preset", "schedule")), inp.id


def test_the_node_shows_what_the_run_did(host, monkeypatch):
    node = host.pack_nodes()["SDTMPatchModel"]
    shown = []
    server = types.SimpleNamespace(send_progress_text=lambda text, node_id, sid=None: shown.append((node_id, text)))
    fake = types.ModuleType("server")
    fake.PromptServer = types.SimpleNamespace(instance=server)
    monkeypatch.setitem(sys.modules, "server", fake)
    (patched,) = host.run_node(node, node_id="17", model=host.tiny_flux(), **host.node_inputs(node, start_percent=0.0))
    host.sample(patched, steps=3)
    assert len(shown) == 1 and shown[0][0] == "17", shown
    assert "image tokens computed" in shown[0][1] and "s/step over 3 steps" in shown[0][1], shown
    # without a server (scripts, tests) nothing is shown and nothing fails
    monkeypatch.delitem(sys.modules, "server")
    host.sample(patched, steps=3)
    assert len(shown) == 1
    assert torch.isfinite(host.sample(patched, steps=2)).all()



METHODS = {"SDTMPatchModel": "SDTM", "TokenDensityPatchModel": "DensitySchedule", "CATPruningPatchModel": "CATPruning"}
# A valid other value for each widget a schedule replaces (a new one must be added here); booleans flip.
OTHER_VALUE = {"ratio": 0.3, "deviation": 0.02, "stage_windows": "4, 3, 2, 2", "bottom_dense": 0.3, "top_dense": 0.3}


def _decisions(method, node_id):
    """What a patch method decides over blocks and progress: the part a connected schedule drives."""
    points = [(b, p) for b in range(8) for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
    if node_id == "SDTMPatchModel":
        return [method.ratio(b, 8, p) for b, p in points]
    if node_id == "TokenDensityPatchModel":
        return [method.window(b, 8, p) for b, p in points]
    return [method.ratio(p, 8) for _, p in points]


def test_presets_route_serves_each_preset_as_widget_values(host):
    """GET /token_reduction/presets: per patch node, its expert widgets, each preset's values for them (the
    node's own config(), so a preset picked in the UI shows what it runs) and the widgets a schedule replaces."""
    import asyncio
    import json
    from aiohttp.test_utils import make_mocked_request
    host.load_pack()
    route = importlib.import_module(host.PACK_NAME + ".nodes.maps_route")
    schedule = importlib.import_module(host.PACK_NAME + ".kernels.schedule_presets").build_schedule("diffcr_like")

    def call(query=""):
        resp = asyncio.run(route.handle_presets(make_mocked_request("GET", route.PRESETS_ROUTE + query)))
        return resp.status, json.loads(resp.body)

    status, table = call()
    assert status == 200 and set(table) == set(PATCH_NODES)
    assert call("?x=1")[0] == 400
    for node_id, entry in table.items():
        node = host.pack_nodes()[node_id]
        kernel = importlib.import_module(f"{host.PACK_NAME}.kernels.{PATCH_NODES[node_id]}")
        widgets = {k: v for k, v in host.node_inputs(node).items() if k != "preset"}
        assert entry["custom"] == "custom" and list(entry["presets"]) == list(kernel.PRESETS)
        assert entry["expert"] == list(widgets)
        for name, values in entry["presets"].items():
            assert list(values) == entry["expert"]
            # Typed into the widgets with preset custom, the values run exactly the preset.
            assert node.config("custom", **values) == node.config(name), (node_id, name)
        # With a schedule connected, the widgets it replaces change nothing the method decides.
        method = getattr(kernel, METHODS[node_id])
        reference = _decisions(method(node.config("custom", **widgets), schedule=schedule), node_id)
        assert entry["schedule_replaces"] and set(entry["schedule_replaces"]) <= set(widgets)
        for name in entry["schedule_replaces"]:
            value = widgets[name]
            other = dict(widgets, **{name: not value if isinstance(value, bool) else OTHER_VALUE[name]})
            assert other[name] != widgets[name]
            changed = method(node.config("custom", **other), schedule=schedule)
            assert _decisions(changed, node_id) == reference, (node_id, name)
            # ... while without one they do (the probe sees the setting).
            assert _decisions(method(node.config("custom", **other)), node_id) != _decisions(
                method(node.config("custom", **widgets)), node_id), (node_id, name)


def test_schedule_widgets_reported_unused_do_not_shape_the_schedule(host):
    """The Token Ratio Schedule node greys the widgets unused_widgets() names: changing any of them leaves
    the schedule as it was, and each widget it leaves active does change it somewhere."""
    host.load_pack()
    node = importlib.import_module(host.PACK_NAME + ".nodes.schedule_node")
    presets = importlib.import_module(host.PACK_NAME + ".kernels.schedule_presets")
    base = dict(preset="linear", ratio=0.5, end_scale=0.25, switch=0.4, progress_curve="", depth_curve="",
                json_text="")
    other = dict(preset="flexdit", ratio=0.3, end_scale=0.8, switch=0.7, progress_curve="0:0.2, 1:0.6",
                 depth_curve="0:1, 1:0.2")
    grid = [(d / 4, p / 8) for d in range(5) for p in range(9)]
    widget = {"switch": "switch_percent", "json_text": "schedule_json"}

    def table(**kw):
        s = presets.build_schedule(**kw)
        return [round(s.ratio(d, p), 6) for d, p in grid]

    cases = [dict(base, preset=p) for p in presets.PRESETS]
    cases += [dict(base, progress_curve="0:0.7, 1:0.1"), dict(base, depth_curve="0:0, 0.5:1, 1:0"),
              dict(base, progress_curve="0:0.7, 1:0.1", depth_curve="0:0, 0.5:1, 1:0")]
    for case in cases:
        unused = node.unused_widgets(case["preset"], case["progress_curve"], case["depth_curve"])
        assert set(node.CALIBRATION_WIDGETS) <= set(unused)
        for key, value in other.items():
            if key == "preset" and value == case["preset"]:
                value = "linear"
            changed = table(**dict(case, **{key: value}))
            name = widget.get(key, key)
            if name in unused:
                assert changed == table(**case), (case, name)
            elif key not in ("progress_curve", "depth_curve") or not case[key]:
                assert changed != table(**case), (case, name)
    saved = presets.build_schedule("flexdit").to_json()
    assert set(node.unused_widgets("linear", schedule_json=saved)) == {*node.SHAPE_WIDGETS, *node.CALIBRATION_WIDGETS}
    assert node.unused_widgets("linear", calibrating=True) == list(node.SHAPE_WIDGETS)


def test_schedule_route_says_what_is_unused_and_when_the_node_calibrates(host):
    import asyncio
    import json
    from urllib.parse import urlencode
    from aiohttp.test_utils import make_mocked_request
    host.load_pack()
    route = importlib.import_module(host.PACK_NAME + ".nodes.maps_route")
    node = importlib.import_module(host.PACK_NAME + ".nodes.schedule_node")

    def call(**query):
        q = dict(preset="constant", ratio="0.5", end_scale="0.25", switch_percent="0.4", **query)
        resp = asyncio.run(route.handle_schedule(make_mocked_request("GET", f"{route.SCHEDULE_ROUTE}?{urlencode(q)}")))
        return resp.status, json.loads(resp.body)

    status, body = call()
    assert status == 200 and body["calibrate"] is False and body["unused"] == node.unused_widgets("constant")
    status, body = call(calibrate="1")
    assert status == 200 and body == {"name": "calibrated", "calibrate": True, "unused": list(node.SHAPE_WIDGETS)}
    status, body = call(calibrate="1", schedule_json=importlib.import_module(
        host.PACK_NAME + ".kernels.schedule_presets").build_schedule("flexdit").to_json())
    assert status == 200 and body["calibrate"] is False and "ratios" in body  # a saved schedule wins
    assert call(calibrate="yes")[0] == 400

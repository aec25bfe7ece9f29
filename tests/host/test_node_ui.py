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
    clone = node.PREPARE_CLASS_CLONE({"UNIQUE_ID": "17"})
    (patched,) = clone.execute(model=host.tiny_flux(), **host.node_inputs(node, start_percent=0.0)).args
    host.sample(patched, steps=3)
    assert len(shown) == 1 and shown[0][0] == "17", shown
    assert "image tokens computed" in shown[0][1] and "s/step over 3 steps" in shown[0][1], shown
    # without a server (scripts, tests) nothing is shown and nothing fails
    monkeypatch.delitem(sys.modules, "server")
    host.sample(patched, steps=3)
    assert len(shown) == 1
    assert torch.isfinite(host.sample(patched, steps=2)).all()

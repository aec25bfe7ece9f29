"""Host tests: ComfyUI's own custom-node loader loads the pack and registers its V3 nodes."""
from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from tools.comfy_host import PACK_ROOT
INSTALL_NAME = "comfyui-token-reduction"  # a typical custom_nodes folder name (this checkout is "main")


@pytest.fixture(scope="module")
def comfy_nodes(host):
    """ComfyUI's top-level `nodes` module (nodes.py of the host checkout)."""
    import nodes
    return nodes


@pytest.fixture(scope="module")
def loaded(comfy_nodes, tmp_path_factory):
    """Load the pack the way ComfyUI does at startup, from a custom_nodes/<name> folder."""
    custom_nodes = tmp_path_factory.mktemp("comfy") / "custom_nodes"
    custom_nodes.mkdir()
    link = custom_nodes / INSTALL_NAME
    os.symlink(PACK_ROOT, link, target_is_directory=True)
    before = set(sys.modules)
    ok = asyncio.run(comfy_nodes.load_custom_node(str(link)))
    return {"ok": ok, "path": str(link), "new_modules": set(sys.modules) - before}


def test_host_nodes_module_is_comfyuis(host, comfy_nodes):
    path, _ = host.find_comfyui()
    assert Path(comfy_nodes.__file__).resolve() == (path / "nodes.py").resolve(), \
        "`import nodes` must give ComfyUI's nodes.py, not the pack's nodes package"
    assert callable(comfy_nodes.load_custom_node)
    assert hasattr(comfy_nodes, "NODE_CLASS_MAPPINGS")


def test_load_custom_node_registers_sdtm(comfy_nodes, loaded):
    assert loaded["ok"] is True, "nodes.load_custom_node returned False (see the logged traceback)"
    cls = comfy_nodes.NODE_CLASS_MAPPINGS.get("SDTMPatchModel")
    assert cls is not None
    assert comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS["SDTMPatchModel"] == "SDTM Token Merging"
    assert cls.RELATIVE_PYTHON_MODULE == f"custom_nodes.{INSTALL_NAME}"
    # the class comes from the pack loaded from that folder, not from some other copy
    assert cls.__module__.startswith(loaded["path"].replace(".", "_x_"))
    assert Path(sys.modules[cls.__module__].__file__).resolve() == (PACK_ROOT / "nodes" / "patch_node.py").resolve()
    assert comfy_nodes.LOADED_MODULE_DIRS[INSTALL_NAME] == os.path.abspath(loaded["path"])


def test_loading_does_not_shadow_comfyui_nodes(host, comfy_nodes, loaded):
    import nodes as again
    assert again is comfy_nodes and sys.modules["nodes"] is comfy_nodes
    # the pack's own `nodes` package was imported under the pack's module name only
    pack_nodes = [m for m in loaded["new_modules"] if m.endswith(".nodes")]
    assert pack_nodes, loaded["new_modules"]
    for name in pack_nodes:
        assert Path(sys.modules[name].__file__).resolve().parent == (PACK_ROOT / "nodes").resolve()
    assert "nodes" not in loaded["new_modules"]


def test_pack_never_imports_a_top_level_nodes_module():
    # Inside ComfyUI, `import nodes` / `from nodes import` means ComfyUI's nodes.py; the pack must
    # reach its own package through relative imports only.
    bad = []
    for path in list(PACK_ROOT.glob("*.py")) + list((PACK_ROOT / "nodes").glob("*.py")) + \
            list((PACK_ROOT / "kernels").glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(import nodes\b|from nodes\b|import kernels\b|from kernels\b)", line):
                bad.append(f"{path.relative_to(PACK_ROOT)}:{i}: {line.strip()}")
    assert not bad, bad


def test_registered_node_schema_and_v1_info(comfy_nodes, loaded):
    cls = comfy_nodes.NODE_CLASS_MAPPINGS["SDTMPatchModel"]
    schema = cls.GET_SCHEMA()
    assert schema.node_id == "SDTMPatchModel"
    assert schema.category == "model_patches/token_reduction"
    info = cls.INPUT_TYPES()
    required = info["required"]
    for name in ("model", "ratio", "deviation", "switch_percent", "window", "skip_first_blocks",
                 "skip_last_blocks", "dynamic_merge", "ratio_adjust", "prompt_reweight",
                 "start_percent", "end_percent"):
        assert name in required, name
    assert required["model"][0] == "MODEL"
    # the largest ratio any window allows (4x4: 15 of 16 merged); the config checks it against the chosen window
    assert required["ratio"][1]["min"] == 0.0 and required["ratio"][1]["max"] == 1 - 1 / 16
    assert "schedule" in info.get("optional", {})
    assert list(cls.RETURN_TYPES) == ["MODEL"]


def test_loaded_node_patches_a_model(host, comfy_nodes, loaded):
    import torch
    cls = comfy_nodes.NODE_CLASS_MAPPINGS["SDTMPatchModel"]
    model = host.tiny_flux()
    defaults = host.node_inputs(cls)
    base = host.sample(model, height=128, width=128)
    (patched,) = host.run_node(cls, model=model, **defaults)
    out = host.sample(patched, height=128, width=128)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    (off,) = host.run_node(cls, model=model, **dict(defaults, start_percent=1.0))
    assert torch.equal(host.sample(off, height=128, width=128), base)


def test_every_node_input_and_output_has_a_tooltip_and_the_pack_category(host):
    """Every input of every pack node explains itself on hover, and numbers carry a default and bounds."""
    from comfy_api.latest import io
    numbers = 0
    for node_id, cls in host.pack_nodes().items():
        schema = cls.define_schema()
        assert schema.category == "model_patches/token_reduction", node_id
        assert schema.description, node_id
        for i in schema.inputs:
            assert i.tooltip and len(i.tooltip) > 10, f"{node_id}.{i.id} has no tooltip"
            if isinstance(i, (io.Float.Input, io.Int.Input)):
                numbers += 1
                assert i.default is not None and i.min is not None and i.max is not None, f"{node_id}.{i.id}"
                assert i.min <= i.default <= i.max, f"{node_id}.{i.id}"
        for o in schema.outputs:
            assert o.tooltip, f"{node_id} output {o.display_name or o.io_type} has no tooltip"
    assert numbers > 20, numbers  # the numeric check above really ran

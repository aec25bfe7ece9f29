"""The Comfy Registry metadata in pyproject.toml ([tool.comfy]): it names the whole pack, its icon is a
file the pack ships in a format and size the registry takes, and requires-comfyui is the tested range."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from kernels.registry import TESTED_COMFYUI
from tools.comfy_host import PACK_ROOT

tomllib = pytest.importorskip("tomllib", reason="tomllib arrived in Python 3.11")


@pytest.fixture(scope="module")
def meta():
    with open(PACK_ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_names_cover_the_whole_pack(meta):
    comfy, description = meta["tool"]["comfy"], meta["project"]["description"]
    for method in ("SDTM", "CAT", "density", "schedule"):
        assert method.lower() in comfy["DisplayName"].lower(), f"DisplayName does not name {method}"
        assert method.lower() in description.lower(), f"description does not name {method}"
    assert "token map" in description.lower()


def test_requires_the_oldest_tested_comfyui(meta):
    oldest = min(TESTED_COMFYUI, key=lambda v: tuple(int(x) for x in v.split(".")))
    assert meta["tool"]["comfy"]["requires-comfyui"] == f">={oldest}"


def test_icon_is_a_shipped_svg_the_registry_takes(meta):
    """The registry takes SVG, PNG, JPG or GIF icons up to 800 x 400 px."""
    icon = meta["tool"]["comfy"]["Icon"]
    path = PACK_ROOT / re.sub(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/", "", icon)
    assert path.is_file() and path.parent.name == "web" and path.suffix == ".svg", icon
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    width, height = float(root.get("width")), float(root.get("height"))
    assert 0 < width <= 800 and 0 < height <= 400, (width, height)

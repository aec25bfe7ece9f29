import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def missing_requirements() -> list[str]:
    """The packages of requirements.txt and requirements-dev.txt this Python cannot import (each of them is
    imported under its own name)."""
    names = []
    for req in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / req).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                names.append(re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0])
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def pytest_configure(config):
    """Without the pack's requirements every test module fails to import: say so once, in one line."""
    missing = missing_requirements()
    if missing:
        raise pytest.UsageError(
            f"{sys.executable} has no {', '.join(missing)}: run the tests with the Python of the venv that the "
            "README's first command makes (.venv/bin/python), or install requirements.txt and requirements-dev.txt "
            "into this one")


@pytest.fixture(scope="session")
def host():
    """The imported ComfyUI host; skips the test, with the reason, when there is none."""
    from tools import comfy_host as host_mod
    err = host_mod.import_host()
    if err:
        pytest.skip(f"needs the ComfyUI host: {err}")
    return host_mod


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small CPU runs: faster so, and far steadier on a shared CPU."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


KINDS = ("unit", "host", "evidence")


def pytest_collection_modifyitems(items):
    """Each test carries the marker of its folder (tests/unit, tests/host, tests/evidence): `-m unit` etc."""
    for item in items:
        kind = item.path.parent.name
        if kind in KINDS:
            item.add_marker(getattr(pytest.mark, kind))

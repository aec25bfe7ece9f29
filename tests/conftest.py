import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def host():
    """The imported ComfyUI host; skips the test, with the reason, when there is none."""
    import host as host_mod
    err = host_mod.import_host()
    if err:
        pytest.skip(f"needs the ComfyUI host: {err}")
    return host_mod

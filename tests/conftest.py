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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small CPU runs: faster so, and far steadier on a shared CPU."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

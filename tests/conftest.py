import pytest


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

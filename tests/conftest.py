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


# ---- one-row views of the batched selection, and the schedule CAT's begin_call follows (tests import them from here) ----

def kmeans_labels(noise, grid, k: int, seed: int = 0):
    """Cluster label (N,) per token of noise (N, D)."""
    from kernels.cat_select import kmeans_labels_batched
    return kmeans_labels_batched(noise.unsqueeze(0), grid, k, seed)[0]


def select_tokens(delta, labels, age, n_keep: int, balance: float, first: bool):
    """Image tokens to compute (n_keep,), ascending; one row of select_tokens_batched."""
    from kernels.cat_select import cluster_counts, select_tokens_batched
    k = int(labels.max()) + 1 if labels.numel() else 1
    return select_tokens_batched(delta.unsqueeze(0), labels.unsqueeze(0), age.unsqueeze(0), n_keep, balance, first,
                                 cluster_counts(labels.unsqueeze(0), k))[0]


def staleness_bound(n: int, n_keep: int, balance: float) -> int:
    """Max steps between two computations of any token in the pruned phase."""
    n_stale = max(1, int(round(balance * n_keep)))
    return (n - 1) // n_stale + 1


def step_plan(method, progresses, n_img: int, num_blocks: int = 1) -> list:
    """Image tokens computed per step for these progress values, as begin_call would decide them."""
    out, pruned_since_full, history = [], 0, False
    for p in progresses:
        if not method.is_active(p):
            out.append(n_img)
            pruned_since_full, history = 0, False
            continue
        n_keep = method.n_keep(n_img, p, num_blocks)
        full = not history or method._scheduled_full(p, n_keep, n_img, pruned_since_full)
        out.append(n_img if full else n_keep)
        pruned_since_full = 0 if full else pruned_since_full + 1
        history = True
    return out

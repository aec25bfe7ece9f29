"""Peak memory of a sampling run (tools/report.cpu_peak_bytes, the CPU profiler's tensor allocations) on the
reference model: SDTM and the density schedule, at their defaults and every preset, stay within MAX_EXTRA
of the unpatched run."""
from __future__ import annotations

import pytest

from kernels.methods import SPECS
from tools import reference_dit as R
from tools.report import cpu_peak_bytes

MAX_EXTRA = 0.05
SETTINGS = [pytest.param(spec, kwargs, id=f"{spec.key}-{preset}")
            for spec in SPECS if spec.merging
            for preset, kwargs in [("defaults", {}), *((p, kw) for p, kw in spec.presets.items() if kw)]]


def _peak(model, method) -> int:
    to = None if method is None else R.method_options(method, model, "memory")
    return cpu_peak_bytes(lambda: R.sample(model, [0, 1, 2, 3], steps=10, transformer_options=to))


@pytest.fixture(scope="module")
def model_and_base(one_torch_thread):
    model, _ = R.build_model()
    return model, _peak(model, None)


@pytest.mark.parametrize("spec,kwargs", SETTINGS)
def test_merging_keeps_peak_memory_near_the_unpatched_run(model_and_base, spec, kwargs):
    model, base = model_and_base
    peak = _peak(model, spec.with_settings(kwargs))
    assert peak <= (1 + MAX_EXTRA) * base, (peak, base)

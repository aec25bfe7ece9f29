"""Peak memory of a sampling run (tools/report.cpu_peak_bytes, the CPU profiler's tensor allocations) on the
reference model: SDTM and the density schedule, at their defaults and every preset, stay within MAX_EXTRA
of the unpatched run."""
from __future__ import annotations

import pytest

from kernels import density, sdtm
from tools import reference_dit as R
from tools.report import cpu_peak_bytes

MAX_EXTRA = 0.05
SETTINGS = [pytest.param(cls, config, kwargs, id=f"{cls.name}-{preset}")
            for cls, config, presets in ((sdtm.SDTM, sdtm.SDTMConfig, sdtm.PRESETS),
                                         (density.DensitySchedule, density.DensityConfig, density.PRESETS))
            for preset, kwargs in [("defaults", {}), *((p, kw) for p, kw in presets.items() if kw)]]


def _peak(model, method) -> int:
    to = None if method is None else R.method_options(method, model, "memory")
    return cpu_peak_bytes(lambda: R.sample(model, [0, 1, 2, 3], steps=10, transformer_options=to))


@pytest.fixture(scope="module")
def model_and_base(one_torch_thread):
    model, _ = R.build_model()
    return model, _peak(model, None)


@pytest.mark.parametrize("cls,config,kwargs", SETTINGS)
def test_merging_keeps_peak_memory_near_the_unpatched_run(model_and_base, cls, config, kwargs):
    model, base = model_and_base
    peak = _peak(model, cls(config(**kwargs)))
    assert peak <= (1 + MAX_EXTRA) * base, (peak, base)

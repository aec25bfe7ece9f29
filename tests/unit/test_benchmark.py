"""tools/benchmark.py's wall-time section, run at its small size on the CPU (the path the GPU table takes):
every setting, bias-free attention and the fp8 cache included, gets a row with a finite speedup."""
from __future__ import annotations

import math

from tools import benchmark as B


def test_small_time_section_has_a_row_with_a_finite_speedup_for_every_setting(one_torch_thread):
    rep = B.main(["--sections", "time", "--size", "small", "--repeats", "1", "--no-host"])
    rows = {}
    for line in rep.lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[2].endswith("x"):
            rows[cells[0]] = cells
    names = [name for name, _ in B.TIME_SETTINGS]
    assert set(rows) == set(names), sorted(set(names) ^ set(rows))
    assert any(n.endswith(B.BIAS_FREE) for n in names) and B.FP8_CACHE in names
    for name, cells in rows.items():
        speedup = float(cells[2][:-1])
        assert math.isfinite(speedup) and speedup > 0, cells
        assert math.isfinite(float(cells[5])), cells
    assert rows["unpatched"][2] == "1.00x"

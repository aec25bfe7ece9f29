"""The pack's token-reduction methods: one MethodSpec (kernels/method_spec.py) per method, host-free.

The patch nodes (nodes/patch_node.py), the docs, the benchmark, compare.py, the demo and the tests read
this list. Adding a method: one kernel module with its config, its TokenMethod and its SPEC, and one entry
here.
"""
from __future__ import annotations

from . import cat, density, sdtm
from .method_spec import MethodSpec

SPECS: tuple[MethodSpec, ...] = (sdtm.SPEC, density.SPEC, cat.SPEC)
BY_KEY = {s.key: s for s in SPECS}
BY_NODE = {s.node_id: s for s in SPECS}

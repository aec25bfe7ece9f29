"""The CPU proxy of a method's overhead (tools/benchmark.op_counts): every method, at its defaults and at
every preset, adds at most MAX_OPS aten ops per block call (mean over a whole sampling run) and at most
MAX_SYNCS host synchronisations per step. On a GPU each op is a kernel launch and each sync stalls the
queue, so these are the budgets of the wall-time gain, not of the FLOPs."""
from __future__ import annotations

import pytest
import torch

from kernels.methods import BY_KEY, SPECS
from kernels.runtime import MergingMethod
from tools import benchmark as B

MAX_OPS = 30
MAX_SYNCS = 1

SETTINGS = [pytest.param(spec, kwargs, id=f"{spec.key}-{preset}")
            for spec in SPECS for preset, kwargs in [("defaults", {}), *spec.presets.items()]]


@pytest.mark.parametrize("spec,kwargs", SETTINGS)
def test_every_method_and_preset_stays_within_the_overhead_budget(one_torch_thread, spec, kwargs):
    counts = B.op_counts(lambda: spec.with_settings(kwargs))
    assert counts["ops_per_block_call"] <= MAX_OPS, counts
    assert counts["syncs_per_step"] <= MAX_SYNCS, counts["sync_ops"]


class _Syncing(MergingMethod):
    """Merges nothing; reads the tokens back to the host in the ways the proxy must notice."""

    name = "syncing probe"

    def __init__(self):
        pass

    def is_active(self, progress):
        return True

    def plan(self, tokens, grid, block, num_blocks, progress):
        tokens[0, :2, 0].tolist()                     # no aten op on the CPU at all
        _ = tokens[0, :, 0][tokens[0, :, 0] > 0]      # a boolean mask: a nonzero inside the index op
        return None


def test_the_proxy_sees_syncs_that_dispatch_no_sync_op(one_torch_thread):
    counts = B.op_counts(_Syncing, steps=2)
    assert counts["sync_ops"] == {"tolist": 12, "index (boolean mask)": 12}, counts["sync_ops"]
    assert counts["syncs_per_step"] == 12.0  # 6 blocks x 2 syncs


def test_the_unpatched_model_adds_nothing(one_torch_thread):
    counts = B.op_counts(lambda: None, steps=2)
    assert counts["ops_per_block_call"] == 0 and counts["syncs_per_step"] == 0
    assert torch.get_num_threads() == 1


def test_the_proxy_runs_at_the_256px_models_token_grid(one_torch_thread):
    """--model 256px: Flux's 64x64 grid and the model's blocks at the proxy's width (two steps keep it short)."""
    config = B.proxy_config("256px")
    assert (config.image_size // config.patch_size) ** 2 == 4096 and config.hidden == B.PROXY_MODEL.hidden
    assert B.parse_args(["--sections", "proxy", "--model", "256px"]).model == "256px"
    counts = B.op_counts(lambda: BY_KEY["density"].build(), config, steps=2)
    assert 0 < counts["ops_per_block_call"] <= MAX_OPS and counts["syncs_per_step"] <= MAX_SYNCS, counts

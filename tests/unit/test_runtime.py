"""kernels/runtime.py: the call lifecycle every host drives, host-free."""
import logging

import pytest
import torch

from kernels import runtime
from kernels.families import flux_family, qwen_image_family
from kernels.flops import block_flops
from kernels.runtime import MergingMethod, Runtime, RunStats, TokenMethod, token_grid
from kernels.sdtm import EVERY_STEP_MERGED, SDTM, SDTMConfig

FLUX = flux_family("Flux", 1, 1, text_order_from_calls=False)  # a fixed layout; TextOrder has its own tests


def _args(n_txt=4, n_img=16, c=8, pe_len=None):
    g = torch.Generator().manual_seed(0)
    pe_len = n_txt + n_img if pe_len is None else pe_len
    return {"img": torch.randn(1, n_img, c, generator=g), "txt": torch.randn(1, n_txt, c, generator=g),
            "vec": torch.randn(1, c, generator=g), "pe": torch.randn(1, 1, pe_len, 2, 2, 2, generator=g)}


def _identity(a):
    return {"img": a["img"], "txt": a["txt"]}


def test_token_grid_of_images_and_videos():
    assert token_grid((1, 16, 9, 11), 2) == (5, 6)
    assert token_grid((1, 16, 3, 8, 10), 2) == (3, 4, 5), "time is patched by 1"


def test_one_run_counts_steps_and_frees_its_state():
    class Stateful(TokenMethod):
        name = "stateful"

        def new_run_state(self):
            return type("State", (), {"peak_cache_bytes": 3 * 2 ** 20, "clear": lambda s: setattr(s, "cleared", 1)})()

    rt = Runtime(Stateful(), FLUX, 2, "k")
    to = {}
    run = rt.start_run(to)
    x = torch.zeros(1, 16, 8, 8)
    for sigma in (1.0, 1.0, 0.5, 0.2):  # cond and uncond called one by one at one sigma are one step
        rt.begin_call(dict(to), x, sigma, 1 - sigma, 4)
    lines = rt.end_run(run)
    assert run.stats.steps == 3
    assert lines[1] == "stateful: cache peak 3.0 MiB, freed" and run.state.cleared == 1


def test_block_replace_runs_the_method_and_chains_what_was_there():
    seen = []
    previous = lambda args, extra: seen.append("previous") or extra["original_block"](args)  # noqa: E731
    rt = Runtime(SDTM(SDTMConfig(**{**EVERY_STEP_MERGED, "start_percent": 0.0, "ratio": 0.5, "deviation": 0.0})),
                 FLUX, 2, "k")
    to = {}
    rt.start_run(to)
    replace = rt.block_replaces({("double_block", 0): previous})[("double_block", 0)]
    call_to = dict(to)
    rt.begin_call(call_to, torch.zeros(1, 16, 8, 8), 0.5, 0.5, 4)
    out = replace(dict(_args(), transformer_options=call_to), {"original_block": _identity})
    assert seen == ["previous"]
    assert out["img"].shape == (1, 16, 8)
    stats = to[runtime.RUNS_KEY]["k"].stats
    assert stats.block_calls == stats.merged_calls == 1 and stats.tokens_computed < stats.tokens_in == 16


def test_a_call_that_does_not_fit_runs_unreduced_with_one_warning(caplog):
    fam = qwen_image_family("QwenImage", 1)
    rt = Runtime(SDTM(SDTMConfig(**{**EVERY_STEP_MERGED, "start_percent": 0.0})), fam, 2, "k")
    to = {}
    rt.start_run(to)
    replace = rt.block_replaces()[("double_block", 0)]
    seen = []

    def block(a):
        seen.append(a["img"].shape[1])
        return _identity(a)

    with caplog.at_level(logging.WARNING, logger="token_reduction"):
        for _ in range(3):
            call_to = dict(to)
            rt.begin_call(call_to, torch.zeros(1, 16, 8, 8), 0.5, 0.5, 4)
            args = _args(pe_len=7)  # a rotary table that fits neither token axis
            out = replace(dict(args, transformer_options=call_to), {"original_block": block})
            assert torch.equal(out["img"], args["img"])
    assert seen == [16, 16, 16], "every call ran on every token"
    warnings = [r.getMessage() for r in caplog.records if "not recognised" in r.getMessage()]
    assert len(warnings) == 1 and "rotary table" in warnings[0], warnings


def test_run_stats_price_token_counts_with_the_one_flops_formula():
    s = RunStats()
    s.add(16, 8, None, 4)        # merged: 8 of 16 image tokens, 4 text tokens
    s.add(16, 4, 16, 4)          # pruned: 4 queries against every key
    full = 2 * block_flops(20, 32)
    done = block_flops(12, 32) + block_flops(8, 32, n_keys=20)
    assert s.flops(32) == pytest.approx(done) and s.flops(32, full=True) == pytest.approx(full)
    assert s.flops_share(32) == pytest.approx(done / full)
    assert s.computed_share == 12 / 32


def test_observers_hear_each_block_of_the_calls_they_listen_to():
    heard = []

    class Listener(runtime.CallListener):
        def count(self, block, n_img, n_computed, n_other, width):
            heard.append(("count", block, n_img, n_computed, n_other, width))

        def plan(self, block, plan):
            heard.append(("plan", block, plan.n_out))

    class Observer(runtime.Observer):
        def begin_run(self, sigmas, grid):
            heard.append(("run", tuple(sigmas), grid))

        def begin_call(self, call):
            return Listener() if call.sigma < 1.0 else None  # listens to the second call only

    rt = Runtime(SDTM(SDTMConfig(**{**EVERY_STEP_MERGED, "start_percent": 0.0, "ratio": 0.5, "deviation": 0.0})),
                 FLUX, 2, "k", observer=Observer())
    to = {runtime.OBSERVER_KEY: rt.observer}
    rt.start_run(to, torch.tensor([1.0, 0.5, 0.0]), (1, 16, 8, 8))
    replace = rt.block_replaces()[("double_block", 0)]
    for sigma in (1.0, 0.5):
        call_to = dict(to)
        rt.begin_call(call_to, torch.zeros(1, 16, 8, 8), sigma, 1 - sigma, 4)
        replace(dict(_args(), transformer_options=call_to), {"original_block": _identity})
    # ratio 0.5 of 16 tokens in whole 2x2 windows: two windows (6 tokens) merged away
    assert heard == [("run", (1.0, 0.5, 0.0), (4, 4)), ("count", 0, 16, 10, 4, 8), ("plan", 0, 10)]


def test_an_observing_method_steps_aside_for_a_reducing_one():
    x = torch.zeros(1, 16, 8, 8)
    rt = Runtime(runtime.Unreduced(), FLUX, 2, "maps")
    alone = {runtime.METHODS_KEY: [runtime.Installed.of("maps", rt.method)]}
    assert rt.begin_call(dict(alone), x, 0.5, 0.5, 4) is not None
    sdtm = SDTM(SDTMConfig())
    stacked = {runtime.METHODS_KEY: [runtime.Installed.of("maps", rt.method), runtime.Installed.of("sdtm", sdtm)]}
    assert rt.begin_call(dict(stacked), x, 0.5, 0.5, 4) is None


def test_merging_methods_share_one_block_runner():
    class Pool(MergingMethod):
        name = "pool"

        def plan(self, tokens, grid, block, num_blocks, progress):
            return None

    assert Pool.run_block is SDTM.run_block


def test_a_few_step_run_warns_once_and_a_longer_one_not(caplog, monkeypatch):
    monkeypatch.setattr(runtime, "_warned", set())
    rt = Runtime(SDTM(SDTMConfig()), FLUX, 2, "k")
    with caplog.at_level(logging.WARNING, logger="token_reduction"):
        rt.start_run({}, torch.linspace(1, 0, runtime.FEW_STEPS + 2))  # one step more than a few-step run
        assert not caplog.records
        for _ in range(2):
            rt.start_run({}, torch.linspace(1, 0, 5))
    assert [r.getMessage() for r in caplog.records] == [
        "SDTM: at 4 steps, simply sampling fewer steps does about as well as this node at the same work (see "
        "'Few-step models' in the pack's README)."]

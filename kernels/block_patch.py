"""Block replacements that apply a token-reduction method, shared by ComfyUI and the reference model.

`block_replaces` returns `patches_replace["dit"]`-style functions, one per
block of a family. Each reads the per-call CallInfo (token grid, progress) that
the host glue stores in transformer_options under CALL_KEY, asks the method for
a merge plan, and runs the block through kernels.families.run_block_merged.
"""
from __future__ import annotations

from dataclasses import dataclass

from .families import Family, image_span, run_block_merged

CALL_KEY = "token_reduction_call"
RUNS_KEY = "token_reduction_runs"


@dataclass
class CallInfo:
    """What every block of one model call needs to know about the latent."""

    grid: tuple      # token grid (H, W) or (T, H, W)
    n_img: int       # latent image tokens (reference-image tokens come after them)
    n_txt: int       # text tokens in front of the image in single-stream blocks
    progress: float  # 0 at the first full-schedule sigma, 1 at sigma 0


@dataclass
class RunStats:
    """Token counts of one sampling run, for the end-of-run summary."""

    tokens_in: int = 0
    tokens_computed: int = 0
    block_calls: int = 0
    merged_calls: int = 0

    def add(self, n_in: int, n_out: int):
        self.block_calls += 1
        self.tokens_in += n_in
        self.tokens_computed += n_out
        self.merged_calls += int(n_out < n_in)

    def summary(self, name: str) -> str:
        if self.tokens_in == 0:
            return f"{name}: no patched block ran"
        saved = 1.0 - self.tokens_computed / self.tokens_in
        return (f"{name}: image tokens computed {100 * (1 - saved):.1f}% of unpatched "
                f"({100 * saved:.1f}% saved) over {self.block_calls} block calls, "
                f"{self.merged_calls} of them reduced")


def block_replaces(family: Family, method, method_key: str, existing: dict | None = None) -> dict:
    """{block key: replace function} for every block; `existing` replaces are chained beneath."""
    existing = existing or {}
    return {spec.key: _block_replace(family, spec, method, method_key, existing.get(spec.key))
            for spec in family.blocks}


def _block_replace(family, spec, method, method_key, previous):
    def replace(args, extra):
        original = extra["original_block"]
        if previous is not None:  # another patch already replaced this block: run it beneath us
            inner = original
            original = lambda a: previous(a, {"original_block": inner})  # noqa: E731
        to = args.get("transformer_options") or {}
        call = to.get(CALL_KEY)
        if call is None:
            return original(args)
        if not spec.text_in_img and args.get("txt") is not None:
            call.n_txt = args["txt"].shape[1]
        span = image_span(spec, args, call.n_img, call.n_txt)
        if span is None:
            return original(args)
        stats = to.get(RUNS_KEY, {}).get(method_key)
        tokens = args["img"][:, span.img_start:span.img_start + span.n_img]
        plan = method.plan(tokens, call.grid, spec.index, family.num_blocks, call.progress)
        if stats is not None:
            stats.add(span.n_img, span.n_img if plan is None else plan.n_out)
        if plan is None:
            return original(args)
        return run_block_merged(args, original, plan, span, family, method.key_bias(plan))

    return replace

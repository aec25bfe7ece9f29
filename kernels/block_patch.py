"""Block replacements that apply a token-reduction method, shared by ComfyUI and the reference model.

`block_replaces` returns `patches_replace["dit"]`-style functions, one per
block of a family. Each reads the per-call CallInfo (token grid, progress) that
the host glue stores in transformer_options under CALL_KEY, asks the method for
a merge plan, and runs the block through kernels.families.run_block_merged.

A method with its own block runner and per-run state (CAT) instead provides
`new_run_state()`, `begin_call` / `end_call` (called by the host glue around
every model call, see `begin_call` / `end_call` below) and
`run_block(args, original, spec, family, span, call, state, stats)`; its run
state lives in transformer_options under STATE_KEY[method_key].
"""
from __future__ import annotations

from dataclasses import dataclass

from .families import Family, image_span, run_block_merged

CALL_KEY = "token_reduction_call"
RUNS_KEY = "token_reduction_runs"
STATE_KEY = "token_reduction_state"


@dataclass
class CallInfo:
    """What every block of one model call needs to know about the latent."""

    grid: tuple      # token grid (H, W) or (T, H, W)
    n_img: int       # latent image tokens (reference-image tokens come after them)
    n_txt: int       # text tokens in front of the image in single-stream blocks
    progress: float  # 0 at the first full-schedule sigma, 1 at sigma 0
    sigma: float = 0.0   # this call's sigma (a change marks a new step)
    rows: tuple = ()     # one key per batch row: (uuid, cond_or_uncond, row within its chunk)
    reduced: bool = False  # set when any block of this call ran on fewer tokens (merging methods)


def row_keys(transformer_options: dict, batch: int) -> tuple:
    """Key per batch row from ComfyUI's `cond_or_uncond` / `uuids` (one entry per batch chunk)."""
    cu = transformer_options.get("cond_or_uncond") or []
    uuids = transformer_options.get("uuids") or []
    if not cu or batch % len(cu):
        return _index_rows(batch)
    per = batch // len(cu)
    return tuple((str(uuids[i]) if i < len(uuids) else None, cu[i], r) for i in range(len(cu)) for r in range(per))


def call_rows(call: CallInfo, batch: int) -> tuple:
    """The call's key per batch row; hosts that give none (the reference model) get one key per row index."""
    return tuple(call.rows) if len(call.rows) == batch else _index_rows(batch)


def _index_rows(batch: int) -> tuple:
    return tuple((None, None, r) for r in range(batch))


def begin_call(method, transformer_options: dict, method_key: str, family: Family, x):
    """Host glue, before a model call: lets a stateful method plan the call. Returns its state or None."""
    state = (transformer_options.get(STATE_KEY) or {}).get(method_key)
    call = transformer_options.get(CALL_KEY)
    if state is None or call is None or not hasattr(method, "begin_call"):
        return None
    method.begin_call(state, call, x, family.num_blocks)
    return state


def end_call(method, state, noise, grid, patch: int):
    """Host glue, after a model call: (noise with reused tokens, computed-pixel mask) or None."""
    if state is None:
        return None
    return method.end_call(state, noise, grid, patch)


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
        if hasattr(method, "run_block"):
            state = (to.get(STATE_KEY) or {}).get(method_key)
            return method.run_block(args, original, spec, family, span, call, state, stats)
        tokens = args["img"][:, span.img_start:span.img_start + span.n_img]
        plan = method.plan(tokens, call.grid, spec.index, family.num_blocks, call.progress)
        if stats is not None:
            stats.add(span.n_img, span.n_img if plan is None else plan.n_out)
        if plan is None:
            return original(args)
        call.reduced = True
        return run_block_merged(args, original, plan, span, family, method.key_bias(plan))

    return replace

"""The method interface and the one call lifecycle, host-free.

`Runtime` drives a `TokenMethod` on a model family per sampling run, model call and block (ComfyUI's
`patches_replace["dit"]` protocol); the ComfyUI glue, the reference DiT and the benchmark all use it.
Observers (the token-map recorder) hear of plans and masks through `report_plan` / `report_computed`.
"""
from __future__ import annotations

import contextvars
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .families import (BlockSpec, Family, ImageSpan, TextOrder, block_view, image_span, matmul_flops,
                       run_block_merged, shift_ranges, split_tokens)
from .token_ops import MergePlan

CALL_KEY = "token_reduction_call"   # transformer_options: the CallInfo of the current model call
RUNS_KEY = "token_reduction_runs"   # transformer_options: {method key: Run} of the current sampling run

log = logging.getLogger("token_reduction")


class CallShared:
    """Values the blocks of one model call share (rotary gathers, attention biases, gather indices): built
    by the first block that asks, reused while their sources are the same objects; dies with its call."""

    def __init__(self):
        self._values: dict = {}

    def get(self, key, sources: tuple, make: Callable):
        if torch.compiler.is_compiling():  # a lookup would guard the compiled graph on this store
            return make()
        hit = self._values.get(key)
        if hit is not None and len(hit[0]) == len(sources) and all(a is b for a, b in zip(hit[0], sources)):
            return hit[1]
        value = make()
        self._values[key] = (sources, value)
        return value


@dataclass
class CallInfo:
    """What every block of one model call needs to know about the latent."""

    grid: tuple      # token grid (H, W) or (T, H, W)
    n_img: int       # latent image tokens
    n_txt: int       # text tokens in front of the image in single-stream blocks
    progress: float  # 0 at the first full-schedule sigma, 1 at sigma 0
    sigma: float = 0.0   # a change marks a new step
    rows: tuple = ()     # one key per batch row: (uuid, cond_or_uncond, row within its chunk)
    reduced: bool = False  # some block of this call ran on fewer tokens
    full: bool = False     # a method's begin_call asks for a call on every token (a refresh step)
    num_blocks: int = 0
    patch: int = 1
    shared: CallShared = field(default_factory=CallShared, repr=False, compare=False)
    previous_output: dict | None = field(default=None, repr=False, compare=False)
    txt_stream: torch.Tensor | None = field(default=None, repr=False, compare=False)  # families.TextOrder's
    text_first: bool | str | None = None  # this call's single-stream order (families.TextOrder)

    def release_previous_output(self):
        """Empty the dict the previous block returned: the host (Flux's forward_orig) holds it until the next
        block returns, which would keep one extra activation alive above the unpatched peak."""
        if self.previous_output is not None:
            self.previous_output.clear()
            self.previous_output = None


def token_grid(shape, patch: int) -> tuple:
    """Token grid of a latent (B, C, H, W) or video latent (B, C, T, H, W); time is patched by 1."""
    grid = tuple(math.ceil(s / patch) for s in shape[2:])
    if len(shape) == 5:
        grid = (int(shape[2]),) + grid[1:]
    return grid


def row_keys(transformer_options: dict, batch: int) -> tuple:
    """Key per batch row from ComfyUI's `cond_or_uncond` / `uuids` (one entry per chunk)."""
    cu = transformer_options.get("cond_or_uncond") or []
    uuids = transformer_options.get("uuids") or []
    if not cu or batch % len(cu):
        return _index_rows(batch)
    per = batch // len(cu)
    return tuple((str(uuids[i]) if i < len(uuids) else None, cu[i], r) for i in range(len(cu)) for r in range(per))


def call_rows(call: CallInfo, batch: int) -> tuple:
    """The call's key per batch row; hosts that give none (the reference model) get one per row index."""
    return tuple(call.rows) if len(call.rows) == batch else _index_rows(batch)


def _index_rows(batch: int) -> tuple:
    return tuple((None, None, r) for r in range(batch))


@dataclass
class StepCounter:
    """A run's steps read from sigma: a call at a new sigma starts a step (cond and uncond called apart share
    one) and rising sigma starts a new run; counts the reduced steps since the last full one."""

    last_sigma: float | None = None
    last_full: bool = True
    reduced_since_full: int = 0

    def starts_new_run(self, sigma: float) -> bool:
        return self.last_sigma is not None and sigma > self.last_sigma + 1e-9

    def count(self, sigma: float):
        """Count a call at `sigma` (after a new run has reset the counter)."""
        if self.last_sigma is not None and sigma != self.last_sigma:
            self.reduced_since_full = 0 if self.last_full else self.reduced_since_full + 1
        self.last_sigma = sigma


@dataclass
class RunStats:
    """Token counts of one run, kept as linear tokens and attention pairs so any width can be priced."""

    tokens_in: int = 0
    tokens_computed: int = 0
    block_calls: int = 0
    merged_calls: int = 0
    linear: float = 0.0
    pairs: float = 0.0
    full_linear: float = 0.0
    full_pairs: float = 0.0
    width: int = 0
    steps: int = 0          # model calls at a new sigma
    seconds: float = 0.0    # wall time of the run

    def add(self, n_in: int, n_out: int, n_keys: int | None = None, n_other: int = 0):
        """One block call: n_out of n_in image tokens computed against n_keys image keys (default n_out),
        plus n_other other tokens."""
        n_keys = n_out if n_keys is None else n_keys
        self.block_calls += 1
        self.tokens_in += n_in
        self.tokens_computed += n_out
        self.merged_calls += int(n_out < n_in)
        self.linear += n_out + n_other
        self.pairs += (n_out + n_other) * (n_keys + n_other)
        self.full_linear += n_in + n_other
        self.full_pairs += (n_in + n_other) ** 2

    @property
    def computed_share(self) -> float:
        return self.tokens_computed / self.tokens_in if self.tokens_in else 1.0

    def flops(self, width: int | None = None, mlp_ratio: float = 4.0, full: bool = False) -> float:
        linear, pairs = (self.full_linear, self.full_pairs) if full else (self.linear, self.pairs)
        return matmul_flops(linear, pairs, width or self.width, mlp_ratio)

    def flops_share(self, width: int | None = None, mlp_ratio: float = 4.0) -> float:
        """Block FLOPs of this run relative to the same blocks unreduced."""
        full = self.flops(width, mlp_ratio, full=True)
        return self.flops(width, mlp_ratio) / full if full else 1.0

    def summary(self, name: str) -> str:
        if self.tokens_in == 0:
            return f"{name}: no patched block ran"
        share = self.computed_share
        per_step = f", {self.seconds / self.steps:.2f} s/step over {self.steps} steps" if self.steps else ""
        return (f"{name}: image tokens computed {100 * share:.1f}% of unpatched "
                f"({100 * (1 - share):.1f}% saved), block FLOPs {100 * self.flops_share():.1f}% of unpatched"
                f"{per_step}; {self.merged_calls} of {self.block_calls} block calls reduced")


@dataclass
class Run:
    """One sampling run of one method: its counts and its state (None for stateless methods)."""

    stats: RunStats
    state: object = None
    started: float = 0.0
    last_sigma: float | None = None


@dataclass
class BlockCall:
    """One block call as a method's `run_block` sees it."""

    args: dict          # the host's block arguments (img, txt, vec, pe, ..., transformer_options)
    original: Callable  # runs the unmodified block on an args dict
    spec: BlockSpec
    family: Family
    span: ImageSpan
    call: CallInfo
    run: Run | None

    _pieces: tuple | None = None

    def pieces(self) -> tuple:
        """families.split_tokens of args["img"], once per block."""
        if self._pieces is None:
            self._pieces = split_tokens(self.args["img"], self.span.img_start, self.span.n_img)
        return self._pieces

    @property
    def image_tokens(self) -> torch.Tensor:
        return self.pieces()[1]

    def count(self, n_computed: int, n_keys: int | None = None):
        """Record that `n_computed` image tokens ran (against `n_keys` image keys, default the same)."""
        if self.run is not None:
            x = self.args["img"]
            stats = self.run.stats
            stats.width = stats.width or int(x.shape[-1])
            stats.add(self.span.n_img, n_computed, n_keys,
                      x.shape[1] - self.span.n_img + self.span.n_txt + self.span.n_txt_after)


def check_fractions(label: str, config, *names: str):
    """Every named field of `config` must lie in [0, 1]."""
    for name in names:
        value = getattr(config, name)
        if not (0.0 <= value <= 1.0):
            raise ValueError(f"{label}: {name} must lie in [0, 1], got {value}")


class TokenMethod:
    """What every method implements; end_call may return (noise, computed pixel mask) to replace what
    was not computed."""

    name = "token method"
    composable = True   # False: no other token-reduction method may patch the same model

    def is_active(self, progress: float) -> bool:
        return self.config.start_percent <= progress < self.config.end_percent

    def new_run_state(self):
        return None

    def begin_call(self, state, call: CallInfo, x: torch.Tensor):
        pass

    def run_block(self, block: BlockCall) -> dict:
        block.count(block.span.n_img)
        return block.original(block.args)

    def end_call(self, state, call: CallInfo, noise: torch.Tensor):
        return None


class MergingMethod(TokenMethod):
    """Methods that merge tokens inside a block: per block a MergePlan or None (families.run_block_merged);
    optionally with a detail cache."""

    detail_cache = None  # kernels.detail_cache.DetailCache when switched on

    def plan(self, tokens: torch.Tensor, grid, block: int, num_blocks: int, progress: float) -> MergePlan | None:
        raise NotImplementedError

    def weighted_attention(self) -> bool:
        """Proportional attention: a merged key counts as often as its group has tokens."""
        return False

    def key_bias(self, plan: MergePlan) -> torch.Tensor | None:
        """(B, M) logit bias of the merged keys, log(group size), when the attention is weighted."""
        return plan.log_sizes() if self.weighted_attention() else None

    def run_block(self, block: BlockCall) -> dict:
        plan = None if block.call.full else self.plan(block.image_tokens, block.call.grid, block.spec.index,
                                                      block.family.num_blocks, block.call.progress)
        block.count(block.span.n_img if plan is None else plan.n_out)
        if plan is None:
            return block.original(block.args)
        report_plan(block.spec.index, plan)
        block.call.reduced = True
        bias, weights = None, None
        if self.weighted_attention():
            if getattr(self.config, "bias_free_attention", False):
                weights = plan.sizes
            else:
                bias = plan.log_sizes(as_keys=True)
        return run_block_merged(block.args, block.original, plan, block.span, block.family, bias,
                                block.call.shared, block.pieces(), key_weights=weights)

    def new_run_state(self):
        return self.detail_cache.new_run_state() if self.detail_cache is not None else None

    def begin_call(self, state, call, x):
        self.detail_cache.begin_call(state, call, x)

    def end_call(self, state, call, noise):
        return self.detail_cache.end_call(state, call, noise)


# ---- observers (the token-map recorder) -------------------------------------------------------------

_OBSERVER: contextvars.ContextVar = contextvars.ContextVar("token_reduction_observer", default=None)


def observe(observer) -> contextvars.Token:
    """Make `observer` (with .plan(block, plan) and .computed_mask(block, mask)) hear of this context's calls."""
    return _OBSERVER.set(observer)


def stop_observing(token: contextvars.Token):
    _OBSERVER.reset(token)


def observing() -> bool:
    """True while an observer listens (a method may skip building a map nobody reads)."""
    return _OBSERVER.get() is not None


def report_plan(block: int, plan: MergePlan):
    observer = _OBSERVER.get()
    if observer is not None:
        observer.plan(block, plan)


def report_computed(block: int, mask: torch.Tensor):
    """A (B, N) per-token mask, 1 = computed in this block, 0 = served from a cache."""
    observer = _OBSERVER.get()
    if observer is not None:
        observer.computed_mask(block, mask)


_warned: set = set()


def warn_once(key, message: str):
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


# ---- the lifecycle ---------------------------------------------------------------------------------

class Runtime:
    """One method bound to one model family: what a host calls per run, per model call and per block."""

    def __init__(self, method: TokenMethod, family: Family, patch_size: int, key: str):
        self.method, self.family, self.patch, self.key = method, family, int(patch_size), key
        self.text_order = TextOrder(family)

    def start_run(self, transformer_options: dict) -> Run:
        run = Run(RunStats(), self.method.new_run_state(), time.perf_counter())
        transformer_options[RUNS_KEY] = {**transformer_options.get(RUNS_KEY, {}), self.key: run}
        return run

    def end_run(self, run: Run) -> list[str]:
        """The run's summary lines; frees its state."""
        run.stats.seconds = time.perf_counter() - run.started
        lines = [run.stats.summary(self.method.name)]
        if run.state is not None:
            lines.append(f"{self.method.name}: cache peak {run.state.peak_cache_bytes / 2 ** 20:.1f} MiB, freed")
            run.state.clear()
        return lines

    def run_of(self, transformer_options: dict) -> Run | None:
        return (transformer_options.get(RUNS_KEY) or {}).get(self.key)

    def begin_call(self, transformer_options: dict, x: torch.Tensor, sigma: float, progress: float, n_txt: int,
                   rows: tuple = ()) -> CallInfo:
        grid = token_grid(x.shape, self.patch)
        call = CallInfo(grid, math.prod(grid), n_txt, progress, sigma, rows, num_blocks=self.family.num_blocks,
                        patch=self.patch)
        transformer_options[CALL_KEY] = call
        run = self.run_of(transformer_options)
        if run is not None:
            if sigma != run.last_sigma:
                run.stats.steps += 1
                run.last_sigma = sigma
            if run.state is not None:
                self.method.begin_call(run.state, call, x)
        return call

    def stateful(self, transformer_options: dict) -> bool:
        run = self.run_of(transformer_options)
        return run is not None and run.state is not None

    def end_call(self, transformer_options: dict, noise: torch.Tensor):
        """The method's end_call on the predicted noise (eps, or a flow model's velocity)."""
        run = self.run_of(transformer_options)
        call = transformer_options.get(CALL_KEY)
        if run is None or run.state is None or call is None or len(call.grid) not in (2, 3):
            return None
        return self.method.end_call(run.state, call, noise)

    def block_replaces(self, existing: dict | None = None) -> dict:
        """{block key: replace} for every block; `existing` replaces are chained beneath."""
        existing = existing or {}
        return {spec.key: self._block_replace(spec, existing.get(spec.key)) for spec in self.family.blocks}

    def _block_replace(self, spec: BlockSpec, previous):
        method, family, key, text_order = self.method, self.family, self.key, self.text_order

        def replace(args, extra):
            host_block = chained(extra["original_block"], previous)
            to = args.get("transformer_options") or {}
            call = to.get(CALL_KEY)
            if call is None:
                return host_block(args)
            call.release_previous_output()
            view, original, back = block_view(family, args, host_block)
            out = back(run(view, original, call, to)) if isinstance(view, dict) else unreduced(view, args, host_block)
            call.previous_output = out
            return out

        def unreduced(why, args, host_block):
            if why is not None:
                not_recognised(why)
            return host_block(args)

        def not_recognised(why):
            warn_once((family.name, why), f"{method.name}: {family.name} block call not recognised ({why}); "
                                          "such calls run unreduced")

        def run(args, original, call, to):
            if not spec.text_in_img and args.get("txt") is not None:
                call.n_txt = args["txt"].shape[1]
            out = None
            span = locate(spec, args, call, family, text_order)
            if isinstance(span, str):  # the call does not look as the family describes it
                not_recognised(span)
            elif span is not None:
                out = method.run_block(BlockCall(args, keeping_ranges(original, args, span), spec, family, span, call,
                                                 (to.get(RUNS_KEY) or {}).get(key)))
            out = original(args) if out is None else out
            text_order.block_done(spec, out, call)
            return out

        return replace


def locate(spec: BlockSpec, args: dict, call, family: Family, text_order: TextOrder) -> ImageSpan | str | None:
    """families.image_span with the text order this call shows; None also while the order is not known."""
    text_first = text_order.of(spec, args, call)
    if text_first is None or isinstance(text_first, str):
        return text_first
    return image_span(spec, args, call.n_img, call.n_txt, family, text_first)


def keeping_ranges(original: Callable, args: dict, span: ImageSpan) -> Callable:
    """`original` for a method to call on reduced args: ranges of a modulation of their own that lie past the
    image tokens follow them back (families.shift_ranges)."""
    end = span.img_start + span.n_img
    return lambda new_args: original(shift_ranges(args, new_args, end, args["img"].shape[1] - new_args["img"].shape[1]))


def chained(original: Callable, previous: Callable | None) -> Callable:
    """The block to run beneath a replacement: `original`, or a replacement already registered there."""
    if previous is None:
        return original
    return lambda a: previous(a, {"original_block": original})

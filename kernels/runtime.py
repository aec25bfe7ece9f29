"""The method interface and the one call lifecycle, host-free.

`Runtime` drives a `TokenMethod` on a model family per sampling run, model call and block (ComfyUI's
`patches_replace["dit"]` protocol); the ComfyUI glue, the reference DiT and the benchmark all use it.
An `Observer` (the token-map recorder) hears of runs, calls, blocks, plans and masks from the runtime.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from .attention import override_attention
from .block_runners import run_block_merged
from .families import BlockSpec, Family, ImageSpan, TextOrder, block_view, image_span, shift_ranges, split_tokens
from .flops import matmul_flops
from .token_ops import MergePlan

CALL_KEY = "token_reduction_call"   # transformer_options: the CallInfo of the current model call
RUNS_KEY = "token_reduction_runs"   # transformer_options: {method key: Run} of the current sampling run
METHODS_KEY = "token_reduction_methods"  # transformer_options: an Installed per method on the model
OBSERVER_KEY = "token_reduction_observer"  # transformer_options: the Observer of the model's runs

log = logging.getLogger("token_reduction")


class Installed(NamedTuple):
    """What stacking rules need to know of a method installed on a model (model options are deep-copied)."""

    key: str
    name: str
    composable: bool
    observes_only: bool

    @classmethod
    def of(cls, key: str, method) -> "Installed":
        return cls(key, method.name, method.composable, method.observes_only)


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
    num_blocks: int = 0
    patch: int = 1
    shared: CallShared = field(default_factory=CallShared, repr=False, compare=False)
    observer: object = field(default=None, repr=False, compare=False)  # the Observer's per-call listener
    previous_output: dict | None = field(default=None, repr=False, compare=False)
    txt_stream: torch.Tensor | None = field(default=None, repr=False, compare=False)  # families.TextOrder's
    text_first: bool | str | None = None  # this call's single-stream order (families.TextOrder)
    replaceable: bool = True  # end_call will see the output (the host recovers the noise): a method may skip

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

    def add(self, n_in: int, n_out: int, n_keys: int | None = None, n_other: int = 0, skipped: bool = False):
        """One block call: n_out of n_in image tokens computed against n_keys image keys (default n_out),
        plus n_other other tokens; `skipped`: the block did not run at all (its other tokens neither)."""
        n_keys = n_out if n_keys is None else n_keys
        self.block_calls += 1
        self.tokens_in += n_in
        self.tokens_computed += n_out
        self.merged_calls += int(n_out < n_in)
        if not skipped:
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
    """One sampling run of one method: its counts, its state (None for stateless methods) and the decision
    its begin_call returned for the model call under way."""

    stats: RunStats
    state: object = None
    started: float = 0.0
    steps: StepCounter = field(default_factory=StepCounter)
    decision: object = None


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

    @property
    def decision(self):
        """What the method's begin_call decided for this model call (None: stateless, or no decision)."""
        return self.run.decision if self.run is not None else None

    @property
    def skipped(self) -> bool:
        """The decision serves the whole call (its `skip`): no block runs, end_call replaces the output."""
        return bool(getattr(self.decision, "skip", False))

    @property
    def observed(self) -> bool:
        """An observer listens (a method may skip building a map nobody reads)."""
        return self.call.observer is not None

    def report_plan(self, plan: MergePlan):
        if self.call.observer is not None:
            self.call.observer.plan(self.spec.index, plan)

    def report_computed(self, mask: torch.Tensor):
        """A (B, N) per-token mask, 1 = computed in this block, 0 = served from a cache."""
        if self.call.observer is not None:
            self.call.observer.computed_mask(self.spec.index, mask)

    def pieces(self) -> tuple:
        """families.split_tokens of args["img"], once per block."""
        if self._pieces is None:
            self._pieces = split_tokens(self.args["img"], self.span.img_start, self.span.n_img)
        return self._pieces

    @property
    def image_tokens(self) -> torch.Tensor:
        return self.pieces()[1]

    def count(self, n_computed: int, n_keys: int | None = None, skipped: bool = False):
        """Record that `n_computed` image tokens ran (against `n_keys` image keys, default the same);
        `skipped`: the block did not run."""
        x = self.args["img"]
        n_other = x.shape[1] - self.span.n_img + self.span.n_txt + self.span.n_txt_after
        if self.run is not None:
            stats = self.run.stats
            stats.width = stats.width or int(x.shape[-1])
            stats.add(self.span.n_img, n_computed, n_keys, n_other, skipped)
        if self.call.observer is not None:
            self.call.observer.count(self.spec.index, self.span.n_img, n_computed, n_other, int(x.shape[-1]))

    def skip(self) -> dict:
        """The block's output in a skipped call: its inputs unchanged (end_call replaces the call's output)."""
        self.count(0, 0, skipped=True)
        return {name: self.args[name] for name in ("img", "txt") if name in self.args}


def check_fractions(label: str, config, *names: str):
    """Every named field of `config` must lie in [0, 1]."""
    for name in names:
        value = getattr(config, name)
        if not (0.0 <= value <= 1.0):
            raise ValueError(f"{label}: {name} must lie in [0, 1], got {value}")


class TokenMethod:
    """What every method implements. Per model call, begin_call returns the method's decision for it (kept
    by the runtime for the blocks, as BlockCall.decision, and handed to end_call); end_call may return
    (noise, computed pixel mask) to replace what was not computed. A decision whose `skip` is true serves the
    whole call itself (only where call.replaceable): no block runs, and end_call must replace every pixel.
    The base class reduces nothing."""

    name = "token method"
    composable = True      # False: no other token-reduction method may patch the same model
    observes_only = False  # True: it reduces nothing and steps aside when a reducing method is installed

    def is_active(self, progress: float) -> bool:
        return self.config.start_percent <= progress < self.config.end_percent

    def new_run_state(self):
        return None

    def begin_call(self, state, call: CallInfo, x: torch.Tensor):
        return None

    def run_block(self, block: BlockCall) -> dict:
        block.count(block.span.n_img)
        return block.original(block.args)

    def end_call(self, state, call: CallInfo, decision, noise: torch.Tensor):
        return None


class Unreduced(TokenMethod):
    """Runs every token: the method of a model that is only observed (the token-map recorder)."""

    name = "Token maps"
    observes_only = True

    def is_active(self, progress: float) -> bool:
        return True


@dataclass
class MergeCall:
    """A merging method's decision for one model call."""

    full: bool = False     # run every block on every token (a refresh step)
    reduced: bool = False  # some block of the call ran on merged tokens (or, skipped, would have)
    skip: bool = False     # the merged call would be ignored (detail_weight 0): run no block, serve the forecast


class MergingMethod(TokenMethod):
    """Methods that merge tokens inside a block: per block a MergePlan or None (block_runners.run_block_merged);
    optionally with a detail cache. `bias_free_attention`: proportional attention through a value channel
    instead of an additive mask (attention.size_weighted_hook)."""

    detail_cache = None  # kernels.detail_cache.DetailCache when switched on

    def __init__(self, config, schedule=None, bias_free_attention: bool = False):
        self.config = config
        self.schedule = schedule
        self.bias_free_attention = bias_free_attention

    def plan(self, tokens: torch.Tensor, grid, block: int, num_blocks: int, progress: float) -> MergePlan | None:
        raise NotImplementedError

    def merges(self, call: CallInfo) -> bool:
        """Whether some block of this call merges (a call that merges nothing is a full call)."""
        return self.is_active(call.progress)

    def weighted_attention(self) -> bool:
        """Proportional attention: a merged key counts as often as its group has tokens."""
        return False

    def run_block(self, block: BlockCall) -> dict:
        decision = block.decision
        plan = None if decision is not None and decision.full else self.plan(
            block.image_tokens, block.call.grid, block.spec.index, block.family.num_blocks, block.call.progress)
        block.count(block.span.n_img if plan is None else plan.n_out)
        if plan is None:
            return block.original(block.args)
        block.report_plan(plan)
        if decision is not None:
            decision.reduced = True
        bias, weights = None, None
        if self.weighted_attention():
            if self.bias_free_attention:
                weights = plan.sizes
            else:
                bias = plan.log_sizes(as_keys=True)
        return run_block_merged(block.args, block.original, plan, block.span, block.family, bias,
                                block.call.shared, block.pieces(), key_weights=weights)

    def new_run_state(self):
        return self.detail_cache.new_run_state() if self.detail_cache is not None else None

    def begin_call(self, state, call, x) -> MergeCall:
        decision = MergeCall(full=self.detail_cache.wants_full_call(state, call, x))
        if (call.replaceable and not decision.full and self.detail_cache.serves(state, call, x)
                and self.merges(call)):
            decision.skip = decision.reduced = True  # the merged call would be ignored: run none
        return decision

    def end_call(self, state, call, decision: MergeCall, noise):
        return self.detail_cache.end_call(state, call, decision.reduced, noise)


# ---- observers (the token-map recorder) -------------------------------------------------------------

class Observer:
    """What the runtime tells an observer of a model (transformer_options[OBSERVER_KEY]): the runs it owns
    (begin_run / end_run, from the runtime installed with it) and, per model call, a listener (begin_call
    returns one, or None to skip the call) that hears of every block of the call."""

    def begin_run(self, sigmas, grid: tuple):
        pass

    def end_run(self) -> list[str]:
        """Summary lines of the run."""
        return []

    def begin_call(self, call: CallInfo):
        return None


class CallListener:
    """Per model call: what the observer hears of each block (override what you record)."""

    def attention_hook(self, block: int, span: ImageSpan, n_attention: int):
        """An attention hook (attention.override_attention) for this block call, or None."""
        return None

    def count(self, block: int, n_img: int, n_computed: int, n_other: int, width: int):
        pass

    def plan(self, block: int, plan: MergePlan):
        pass

    def computed_mask(self, block: int, mask: torch.Tensor):
        pass


_warned: set = set()
# Runs of at most this many steps are few-step runs (Flux schnell, Z-Image Turbo, Lightning LoRAs), where a
# step cache has little to reuse and the evidence compares each preset with fewer steps instead.
FEW_STEPS = 8


def warn_once(key, message: str):
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


# ---- the lifecycle ---------------------------------------------------------------------------------

class Runtime:
    """One method bound to one model family: what a host calls per run, per model call and per block.
    `observer`: the Observer whose runs this runtime starts and ends (the recorder's own runtime)."""

    def __init__(self, method: TokenMethod, family: Family, patch_size: int, key: str, observer: Observer | None = None):
        self.method, self.family, self.patch, self.key = method, family, int(patch_size), key
        self.observer = observer
        self.text_order = TextOrder(family)

    def start_run(self, transformer_options: dict, sigmas=None, latent_shape=None) -> Run:
        """A fresh run; `sigmas` (the sampler's) and `latent_shape` start the observer's run. A few-step run
        gets one warning: there, sampling fewer steps does about as well as the presets (README, Few-step models)."""
        steps = None if sigmas is None else sigmas.numel() - 1
        if steps is not None and 0 < steps <= FEW_STEPS and not self.method.observes_only:
            warn_once(("few steps", self.method.name),
                      f"{self.method.name}: at {steps} steps, simply sampling fewer steps does about as well as this "
                      "node at the same work (see 'Few-step models' in the pack's README).")
        run = Run(RunStats(), self.method.new_run_state(), time.perf_counter())
        transformer_options[RUNS_KEY] = {**transformer_options.get(RUNS_KEY, {}), self.key: run}
        if self.observer is not None:
            self.observer.begin_run(sigmas.flatten().tolist(), token_grid(latent_shape, self.patch))
        return run

    def end_run(self, run: Run) -> list[str]:
        """The run's summary lines (the observer's, for a method that only observes); frees its state."""
        run.stats.seconds = time.perf_counter() - run.started
        lines = [run.stats.summary(self.method.name)]
        if run.state is not None:
            lines.append(f"{self.method.name}: cache peak {run.state.peak_cache_bytes / 2 ** 20:.1f} MiB, freed")
            run.state.clear()
        if self.observer is not None:
            observed = self.observer.end_run()
            if self.method.observes_only:
                lines = list(observed)
        return lines

    def run_of(self, transformer_options: dict) -> Run | None:
        return (transformer_options.get(RUNS_KEY) or {}).get(self.key)

    def steps_aside(self, transformer_options: dict) -> bool:
        """An observing-only method steps aside for any reducing method installed on the same model."""
        return self.method.observes_only and any(
            not m.observes_only for m in transformer_options.get(METHODS_KEY, ()))

    def begin_call(self, transformer_options: dict, x: torch.Tensor, sigma: float, progress: float, n_txt: int,
                   rows: tuple = (), replaceable: bool = True) -> CallInfo | None:
        """`replaceable`: the host hands this call's output to end_call (else no method may skip it)."""
        if self.steps_aside(transformer_options):
            return None
        grid = token_grid(x.shape, self.patch)
        call = CallInfo(grid, math.prod(grid), n_txt, progress, sigma, rows, num_blocks=self.family.num_blocks,
                        patch=self.patch, replaceable=replaceable)
        observer = transformer_options.get(OBSERVER_KEY)
        if observer is not None:
            call.observer = observer.begin_call(call)
        transformer_options[CALL_KEY] = call
        run = self.run_of(transformer_options)
        if run is not None:
            if sigma != run.steps.last_sigma:
                run.stats.steps += 1
            run.steps.count(sigma)
            run.decision = self.method.begin_call(run.state, call, x) if run.state is not None else None
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
        decision, run.decision = run.decision, None
        return self.method.end_call(run.state, call, decision, noise)

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
            if call is None or self.steps_aside(to):
                return host_block(args)
            call.release_previous_output()
            view, original, back = block_view(family, args, host_block)
            # The text order is read from the host's own block, not through replaces chained beneath (families
            # read through a block_args view never read it).
            own_block = extra["original_block"] if family.block_args is None else original
            out = (back(run(view, original, own_block, call, to)) if isinstance(view, dict)
                   else unreduced(view, args, host_block))
            call.previous_output = out
            return out

        def unreduced(why, args, host_block):
            if why is not None:
                not_recognised(why)
            return host_block(args)

        def not_recognised(why):
            warn_once((family.name, why), f"{method.name}: {family.name} block call not recognised ({why}); "
                                          "such calls run unreduced")

        def run(args, original, own_block, call, to):
            if not spec.text_in_img and args.get("txt") is not None:
                call.n_txt = args["txt"].shape[1]
            out = None
            text_first = text_order.of(spec, args, call, own_block)
            span = text_first if text_first is None or isinstance(text_first, str) else \
                image_span(spec, args, call.n_img, call.n_txt, family, text_first)
            if isinstance(span, str):  # the call does not look as the family describes it
                not_recognised(span)
            elif span is not None:
                if call.observer is not None:
                    hook = call.observer.attention_hook(spec.index, span,
                                                        span.n_txt + args["img"].shape[1] + span.n_txt_after)
                    if hook is not None:
                        args = {**args, "transformer_options": override_attention(to, hook)}
                block = BlockCall(args, keeping_ranges(original, args, span), spec, family, span, call,
                                  (to.get(RUNS_KEY) or {}).get(key))
                out = block.skip() if block.skipped else method.run_block(block)
            out = original(args) if out is None else out
            text_order.block_done(spec, out, call)
            return out

        return replace


def keeping_ranges(original: Callable, args: dict, span: ImageSpan) -> Callable:
    """`original` for a method to call on reduced args: ranges of a modulation of their own that lie past the
    image tokens follow them back (families.shift_ranges)."""
    end = span.img_start + span.n_img
    n = args["img"].shape[1]
    return lambda new_args: original(shift_ranges(args, new_args, end, n - new_args["img"].shape[1]))


def chained(original: Callable, previous: Callable | None) -> Callable:
    """The block to run beneath a replacement: `original`, or a replacement already registered there."""
    if previous is None:
        return original
    return lambda a: previous(a, {"original_block": original})

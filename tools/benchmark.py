"""Speed benchmark: every method against the unpatched model, side by side in one run.

    python tools/benchmark.py                  # FLOPs at full size and the CPU overhead proxy (minutes on 2 cores)
    python tools/benchmark.py --device cuda    # and seconds per image on the GPU (Flux-dev 1024² / 28 steps, 2048² / 10)
    python tools/benchmark.py --sections time --size small --repeats 1   # the GPU table's path, small, on the CPU

flops  Block FLOPs per image at full size (Flux-dev 1024² and 2048², SD3.5-large 1024² with CFG): each method
       plans on random tokens through kernels.runtime with blocks that do no work (a dry run); the runtime's
       token accounting (RunStats) prices the plans at the model's width with flops.block_flops.
proxy  What a method adds on the CPU over whole sampling runs of a small reference DiT: aten ops dispatched
       per block call beyond the unpatched run's, and device-to-host syncs per step (TorchDispatchMode).
time   Whole images: the reference DiT at the architecture's dimensions with random weights (ComfyUI's own
       Flux blocks when the host imports), one model call per step as Flux-dev (guidance-distilled). Seconds
       per image (median of interleaved repeats), speedup in the same run, peak memory above the weights,
       and the share of time the method spends outside the model's blocks (CUDA events; CPU timers).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from kernels.methods import BY_KEY, SPECS  # noqa: E402
from kernels.attention import ATTENTION_OVERRIDE_KEY  # noqa: E402
from kernels.families import Family, flux_family, mmdit_family  # noqa: E402
from kernels.runtime import RUNS_KEY, RunStats, Runtime  # noqa: E402
from tools import cli, step_cache  # noqa: E402
from tools import reference_dit as R  # noqa: E402
from tools.report import Report, peak_memory, sync  # noqa: E402

SECTIONS = ("flops", "proxy", "time")

BIAS_FREE = ", bias-free attention"
FP8_CACHE = "CAT defaults, fp8 key/value cache"


def settings(bias_free: bool = False, cache_options: bool = False) -> list[tuple[str, Callable]]:
    """Rows of a table: (name, factory of a fresh method or None for the unpatched model). Every method at
    its defaults and at every preset that differs from them; with `bias_free`, the size-weighted methods
    again with attention.size_weighted_hook instead of the additive bias; with `cache_options`, CAT's fp8
    key/value cache."""
    rows = [("unpatched", lambda: None)]
    for spec in SPECS:
        for preset, kwargs in [("defaults", {})] + [(p, kw) for p, kw in spec.presets.items() if kw]:
            name = f"{spec.name} defaults" if preset == "defaults" else f"{spec.name} {preset} preset"
            rows.append((name, lambda spec=spec, kwargs=kwargs: spec.with_settings(kwargs)))
            if bias_free and spec.merging:
                rows.append((name + BIAS_FREE, lambda spec=spec, kwargs=kwargs: spec.method(
                    spec.config(**kwargs), bias_free_attention=True)))
    if cache_options:
        rows.append((FP8_CACHE, lambda: BY_KEY["cat"].with_settings(dict(cache_dtype="fp8"))))
    rows.append((STEP_CACHE, step_cache.through_the_runtime))
    return rows


# The simple alternative beside the nodes (step_cache.through_the_runtime).
STEP_CACHE = "plain step cache (CAT balanced's full steps, no token work between them)"


def preset_methods() -> dict[str, Callable]:
    """{"sdtm:balanced": factory, ...}: every node preset by the key the docs quote it with."""
    return {f"{spec.key}:{preset}": (lambda spec=spec, preset=preset: spec.build(preset))
            for spec in SPECS for preset in spec.presets}


SETTINGS = settings()                                            # FLOPs and the CPU proxy
TIME_SETTINGS = settings(bias_free=True, cache_options=True)     # wall time: also the choices that change no FLOPs


@dataclass(frozen=True)
class Arch:
    title: str
    family: Family
    width: int
    heads: int
    grid: tuple        # image token grid
    n_txt: int
    steps: int
    calls: int = 1     # batch rows per model call (2: cond + uncond with CFG)
    patch: int = 2
    channels: int = 16
    mlp_ratio: float = 4.0

    @property
    def n_img(self) -> int:
        return math.prod(self.grid)


FLUX_DEV = flux_family("Flux", 19, 38, text_order_from_calls=False)  # the dry run's own layout
ARCHS = {
    "flux-1024": Arch("Flux-dev 1024x1024, 28 steps", FLUX_DEV, 3072, 24, (64, 64), 512, 28),
    "flux-2048": Arch("Flux-dev 2048x2048, 10 steps", FLUX_DEV, 3072, 24, (128, 128), 512, 10),
    "sd35-1024": Arch("SD3.5-large 1024x1024, 28 steps, CFG", mmdit_family("SD3", 38), 2432, 38, (64, 64), 333, 28,
                      calls=2),
}
SMALL = Arch("small reference DiT (CPU check of the GPU table)", flux_family("Flux", 2, 4, text_order_from_calls=False),
             128, 2, (16, 16), 16, 8)


# ---- flops: a dry run of the real plans ---------------------------------------------------------------

DRY_WIDTH = 8


def _dry_block(args: dict) -> dict:
    """A block that does no work but call attention once, so attention hooks (CAT's key/value cache) run."""
    override = (args.get("transformer_options") or {}).get(ATTENTION_OVERRIDE_KEY)
    if override is not None:
        seq = torch.cat([args["txt"], args["img"]], 1) if "txt" in args else args["img"]
        override(lambda q, k, v, *a, **kw: q, seq, seq, seq, 1)
    return {k: args[k] for k in ("img", "txt") if k in args}


def dry_run(arch: Arch, method) -> RunStats:
    """Token accounting of one sampling run of `method` at the architecture's token counts."""
    runtime = Runtime(method, arch.family, arch.patch, "bench")
    to: dict = {}
    run = runtime.start_run(to)
    replaces = runtime.block_replaces()
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(arch.calls, arch.channels, arch.grid[0] * arch.patch, arch.grid[1] * arch.patch)
    txt = torch.zeros(arch.calls, arch.n_txt, DRY_WIDTH)
    for i in range(arch.steps):
        call_to = dict(to)
        runtime.begin_call(call_to, x, 1.0 - i / arch.steps, i / arch.steps, arch.n_txt)
        img = torch.randn(arch.calls, arch.n_img, DRY_WIDTH, generator=gen)
        for spec in arch.family.blocks:
            args = {"img": torch.cat([txt, img], 1) if spec.text_in_img else img, "transformer_options": call_to}
            if not spec.text_in_img:
                args["txt"] = txt
            replaces[spec.key](args, {"original_block": _dry_block})
        runtime.end_call(call_to, torch.randn(x.shape, generator=gen))
    runtime.end_run(run)
    return run.stats


def flops_table(rep: Report, archs=("flux-1024", "flux-2048", "sd35-1024")):
    rep("## Block FLOPs per image at full size")
    rep()
    rep("Dry run: each method plans on random tokens through kernels.runtime (blocks do no work); the runtime's "
        "token counts are priced at the model's width (flops.block_flops). Embedders, final layer, text "
        "encoder and VAE are not counted.")
    rep()
    rows = []
    for key in archs:
        arch = ARCHS[key]
        for name, make in SETTINGS:
            method = make()
            if method is None:
                rows.append([arch.title, name, "1.000", "1.00x"])
                continue
            share = dry_run(arch, method).flops_share(arch.width, arch.mlp_ratio)
            rows.append([arch.title, name, f"{share:.3f}", f"{1 / share:.2f}x"])
    rep.table(["model", "setting", "FLOPs / unpatched", "FLOP speedup"], rows)


# ---- proxy: ops and syncs on the CPU ------------------------------------------------------------------

# Ops that make the host wait for the device: a scalar read, or an output whose size depends on values.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "bincount", "unique", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "masked_select", "repeat_interleave", "item", "allclose",
            "_assert_async"}
# Indexing with a boolean mask: the kernel finds the mask's True entries first (a nonzero, inside the op).
MASK_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
# Tensor methods that copy to the host without dispatching any aten op on the CPU (seen at the Python level).
SYNC_METHODS = {"tolist", "numpy"}


class _MethodSyncs(TorchFunctionMode):
    def __init__(self, counter: "OpCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS:
            self.counter.record_sync(name)
        return func(*args, **(kwargs or {}))


class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched, and among them those that synchronise with the device (SYNC_OPS,
    boolean-mask indexing, and the host copies of SYNC_METHODS)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.sync_names: dict = {}
        self._methods = _MethodSyncs(self)

    def record_sync(self, name: str):
        self.syncs += 1
        self.sync_names[name] = self.sync_names.get(name, 0) + 1

    def __enter__(self):
        self._methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._methods.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.record_sync(name)
        elif name in MASK_INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                            for i in (args[1] if len(args) > 1 else ())):
            self.record_sync(f"{name} (boolean mask)")
        return func(*args, **(kwargs or {}))


PROXY_MODEL = R.DiTConfig(image_size=64, patch_size=2, hidden=64, heads=2, axes_dim=(8, 12, 12))
PROXY_STEPS = 10


def proxy_config(model: str | None = None) -> R.DiTConfig:
    """PROXY_MODEL, or a reference model's token grid and blocks (reference_dit.MODEL_CONFIGS) at PROXY_MODEL's
    width: the ops a method adds do not depend on the width, and a narrow model keeps the CPU run short."""
    if model is None:
        return PROXY_MODEL
    return dataclasses.replace(R.MODEL_CONFIGS[model], hidden=PROXY_MODEL.hidden, heads=PROXY_MODEL.heads,
                               axes_dim=PROXY_MODEL.axes_dim)


def op_counts(method_factory: Callable, config: R.DiTConfig = PROXY_MODEL, steps: int = PROXY_STEPS) -> dict:
    """Ops per block call and syncs per step that `method_factory()` adds over a whole sampling run (CFG 3,
    one image; 32x32 = 1024 image tokens on the default config) of a random-weight reference DiT."""
    model = _proxy_model(config.to_json())
    base_ops, base_syncs = _base_counts(config.to_json(), steps)
    method = method_factory()
    c = _count(model, method, steps)
    block_calls = steps * model.family().num_blocks
    return {"ops_per_block_call": (c.ops - base_ops) / block_calls, "syncs_per_step": (c.syncs - base_syncs) / steps,
            "sync_ops": c.sync_names}


@functools.lru_cache(maxsize=2)
def _proxy_model(config_json: str) -> R.ReferenceDiT:
    return R.ReferenceDiT(R.DiTConfig.from_json(config_json)).init_weights(0).eval()


@functools.lru_cache(maxsize=4)
def _base_counts(config_json: str, steps: int) -> tuple[int, int]:
    """The unpatched run's counts (the same for every method compared with it)."""
    c = _count(_proxy_model(config_json), None, steps)
    return c.ops, c.syncs


def _count(model: R.ReferenceDiT, method, steps: int) -> OpCounter:
    to = None if method is None else R.method_options(method, model, "proxy")
    with OpCounter() as c:
        R.sample(model, [0], steps=steps, cfg=3.0, seed=0, transformer_options=to)
    return c


def proxy_table(rep: Report, model: str | None = None):
    config = proxy_config(model)
    rep("## CPU proxy of the overhead: ops and syncs a method adds")
    rep()
    rep(f"Reference DiT with random weights ({config.depth_double} double + {config.depth_single} single "
        f"blocks, {(config.image_size // config.patch_size) ** 2} image tokens"
        f"{f', the {model} model at width {config.hidden}' if model else ''}), {PROXY_STEPS} Euler steps, "
        "CFG 3 (cond and uncond in one call), counted with TorchDispatchMode.")
    rep()
    rows = []
    for name, make in SETTINGS[1:]:
        c = op_counts(make, config)
        syncs = ", ".join(f"{k} {v}" for k, v in sorted(c["sync_ops"].items())) or "none"
        rows.append([name, f"{c['ops_per_block_call']:.1f}", f"{c['syncs_per_step']:.1f}", syncs])
    rep.table(["setting", "aten ops added per block call", "syncs added per step", "sync ops in the run"], rows)


# ---- time: whole images --------------------------------------------------------------------------------

def reference_config(arch: Arch) -> R.DiTConfig:
    head = arch.width // arch.heads
    axes = (head // 8, head * 7 // 16, head * 7 // 16)
    axes = (head - 2 * (head * 7 // 16), head * 7 // 16, head * 7 // 16) if sum(axes) != head else axes
    return R.DiTConfig(image_size=arch.grid[0] * arch.patch, channels=arch.channels, patch_size=arch.patch,
                       hidden=arch.width, heads=arch.heads, depth_double=sum(s.key[0] == "double_block"
                                                                              for s in arch.family.blocks),
                       depth_single=sum(s.key[0] == "single_block" for s in arch.family.blocks),
                       mlp_ratio=arch.mlp_ratio, num_classes=1, txt_len=arch.n_txt, context_dim=64, vec_dim=64,
                       axes_dim=axes)


def build_timed_model(arch: Arch, device, dtype, use_host: bool) -> tuple[R.ReferenceDiT, str]:
    """Random weights drawn on the device (normal, std 1/sqrt(fan_in)); host blocks when ComfyUI imports."""
    layers, desc = None, "the reference DiT's own Flux-style blocks"
    if use_host:
        from tools import comfy_host
        err = comfy_host.import_host(cpu=torch.device(device).type == "cpu")
        if err is None:
            import comfy.ldm.flux.layers
            import comfy.ops
            layers, desc = (comfy.ldm.flux.layers, comfy.ops.disable_weight_init), "ComfyUI's own Flux blocks"
        else:
            desc += f" ({err})"
    config = reference_config(arch)
    torch.manual_seed(0)
    with torch.device(device):
        model = R.ReferenceDiT(config, host_layers=layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5 * (0.5 if "mod" in name else 1.0))
            else:
                p.zero_()
    return model.to(dtype).eval(), desc


class BlockTimer:
    """Per-block timings beneath the methods: events (or perf_counter) around every original block."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = []

    def replaces(self, family: Family) -> dict:
        def replace(args, extra):
            start = self._mark()
            out = extra["original_block"](args)
            self.marks.append((start, self._mark()))
            return out
        return {spec.key: replace for spec in family.blocks}

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            total = sum(a.elapsed_time(b) for a, b in self.marks) / 1000
        else:
            total = sum(b - a for a, b in self.marks)
        self.marks.clear()
        return total


def time_table(rep: Report, device: str, size: str, repeats: int, use_host: bool, warmup_steps: int | None = None):
    """Seconds per image for every TIME_SETTINGS row. Per row one short warm-up image (kernels, allocator,
    the row's token counts), then `repeats` timed images interleaved across rows; each timed image also
    records the blocks' own time (for the method's share outside them) and, on a GPU, the peak memory."""
    archs = [SMALL] if size == "small" else [ARCHS["flux-1024"], ARCHS["flux-2048"]]
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    cuda = torch.device(device).type == "cuda"
    for arch in archs:
        started = time.perf_counter()
        model, desc = build_timed_model(arch, device, dtype, use_host)
        warm = warmup_steps or max(4, arch.steps // 4)
        rep(f"## Seconds per image: {arch.title}, {device}")
        rep()
        rep(f"Blocks: {desc}; random {str(dtype).replace('torch.', '')} weights; {arch.n_img} image + {arch.n_txt} "
            f"text tokens; one model call per step; median of {repeats} interleaved run(s) after a {warm}-step "
            "warm-up image per row.")
        rep()

        def image(make, steps=arch.steps, timer=None):
            method = make()
            base = {"patches_replace": {"dit": timer.replaces(model.family())}} if timer else None
            to = R.method_options(method, model, "bench", base) if method is not None else base
            R.sample(model, [0], steps=steps, cfg=1.0, seed=0, transformer_options=to, device=device)
            return to

        rows = TIME_SETTINGS
        for _, make in rows:  # warm-up
            image(make, steps=warm)
        times = {name: [] for name, _ in rows}
        outside, memory, runs = {}, {}, {}
        for _ in range(repeats):
            for name, make in rows:
                timer = BlockTimer(device)
                sync(device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    held = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                runs[name] = image(make, timer=timer)
                sync(device)
                total = time.perf_counter() - t0
                times[name].append(total)
                outside[name] = total - timer.seconds()  # embedders, final layer, sampler and the method's own work
                if cuda:
                    memory[name] = max(memory.get(name, 0), torch.cuda.max_memory_allocated() - held)
        if not cuda:  # the CPU profiler would slow the timed runs: one more image per row
            memory = {name: peak_memory(lambda make=make: image(make), device) for name, make in rows}
        base_t = statistics.median(times["unpatched"])
        table = []
        for name, _ in rows:
            t = statistics.median(times[name])
            run = (runs[name] or {}).get(RUNS_KEY, {}).get("bench")
            flops = f"{run.stats.flops_share():.3f}" if run is not None else "1.000"
            own = 100 * max(outside[name] - outside["unpatched"], 0.0) / t
            table.append([name, f"{t:.3f}", f"{base_t / t:.2f}x", flops, f"{own:.1f}%",
                          f"{memory[name] / 2 ** 20:.1f}"])
        rep.table(["setting", "s / image", "speedup", "block FLOPs / unpatched", "method's own work",
                   "peak MiB above weights"], table)
        rep(f"({len(rows)} rows in {time.perf_counter() - started:.0f} s.)")
        rep()
        model = None  # free the weights before the next size
        if cuda:
            torch.cuda.empty_cache()


# ---- main ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", type=cli.choice_list(SECTIONS), default=None,
                   help=f"comma list of {', '.join(SECTIONS)} (default: flops,proxy; with --device cuda all three)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the time section)")
    p.add_argument("--size", choices=("full", "small"), default="full",
                   help="time section: full (Flux-dev sizes, for a GPU) or small (a quick check on the CPU)")
    p.add_argument("--repeats", type=cli.positive_int, default=1,
                   help="timed images per setting (median reported; 1 keeps the full GPU run under 6 minutes)")
    p.add_argument("--no-host", action="store_true", help="time the reference DiT's own blocks even with ComfyUI")
    p.add_argument("--model", choices=sorted(R.MODEL_CONFIGS), default=None,
                   help="proxy section: a reference model's token grid and blocks (random weights, the proxy's "
                        "width) instead of the default 32x32-token model")
    p.add_argument("--out", type=cli.out_file, help="also write the report (markdown) to this file")
    args = p.parse_args(argv)
    if args.sections is None:
        args.sections = list(SECTIONS) if args.device.startswith("cuda") else ["flops", "proxy"]
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch here")
    if "time" in args.sections and args.size == "full" and not args.device.startswith("cuda"):
        p.error("the time section at full size needs --device cuda (use --size small for a check on the CPU)")
    cli.writable_file(p, args.out)
    return args


def main(argv=None) -> Report:
    args = parse_args(argv)
    rep = Report()
    rep.header("Speed benchmark", args.device, "tools/benchmark.py", sys.argv[1:] if argv is None else list(argv))
    if "flops" in args.sections:
        flops_table(rep)
    if "proxy" in args.sections:
        proxy_table(rep, args.model)
    if "time" in args.sections:
        time_table(rep, args.device, args.size, args.repeats, not args.no_host)
    rep.write(args.out)
    return rep


if __name__ == "__main__":
    main()

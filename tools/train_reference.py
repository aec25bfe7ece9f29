"""Train the embedded reference DiT (tools/reference_dit.py) on procedural images (tools/procedural.py).

    python tools/train_reference.py --minutes 45 --threads 2            # writes tools/weights/reference_dit.safetensors
    python tools/train_reference.py --model 256px --device cuda --minutes 9 --batch 64 --dtype bfloat16
        # the 256 px scenes model on a GPU (tools/gpu_session.sh runs it; tools/weights/README.md)
    python tools/train_reference.py --steps 20 --batch 8 --out /tmp/w.safetensors   # smoke test
    python tools/train_reference.py --evaluate [--model M] [--out W] [--device cuda] [--grid out/reference_samples.png]
        # velocity error vs. random init and the zero predictor, a class probe on samples, a PNG of samples per class

--model picks the configuration (reference_dit.MODEL_CONFIGS; --config overrides its fields), its data set and
the default --out. Rectified-flow matching: x_sigma = (1 - sigma) * image + sigma * noise, target
v = noise - image, MSE loss. sigma is logit-normal (SD3's default, mean 0, std 1) or uniform. 10% of the
class ids are replaced by the unconditional id (config.num_classes) so that CFG works. AdamW with linear
warmup, then cosine decay over the run's progress: the larger of step / --steps and elapsed / --minutes,
so a wall-clock-limited run still ends at the low learning rate. An EMA of the weights is what gets saved
(every --save-every steps and at the end), with the config, the command, seed, steps done, final loss,
device and date in the safetensors metadata.

On a GPU the defaults are its profile: bf16 autocast (--no-bf16), attention through the flash or
memory-efficient SDPA kernels only, the model compiled by torch.compile (--compile off; a compile that
fails falls back to eager with one line), fused AdamW, and the pictures drawn on the CPU by --workers
background processes while the GPU draws noise and sigmas. The log says how long the loop waited for
pictures.

Without workers (the CPU default) data and sigmas come from one seeded torch.Generator, so a run given
--steps alone (no --minutes) is reproducible on the same torch build and thread count; with workers each
draws from its own seeded generator (reproducible pictures, in worker order).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tools import cli, procedural  # noqa: E402
from tools import reference_dit as R  # noqa: E402

# The 64 px model's configuration: 64x64 px with 4x4 patches -> a 16x16 token grid (256 image tokens).
# Patch 2 (1024 tokens) trains ~18x slower on a CPU; see tools/weights/README.md.
TRAIN_CONFIG = dataclasses.asdict(R.MODEL_CONFIGS["64px"])
SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # the evaluation's noise levels
# Good enough to carry evidence: the model draws its classes (the class probe names at least GOOD_PROBE of its
# samples as their class) and denoises (held-out velocity error at the middle sigmas below GOOD_VELOCITY of the
# zero predictor's).
GOOD_PROBE = 0.8
GOOD_VELOCITY = 0.1
MIDDLE_SIGMAS = (0.3, 0.5, 0.7)


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(R.MODEL_CONFIGS), default="64px",
                   help="reference model: its configuration, data set and default --out (default 64px)")
    p.add_argument("--out", type=cli.out_file, default=None,
                   help="weights file to write (EMA weights), or to read with --evaluate (default: the model's file)")
    p.add_argument("--steps", type=cli.positive_int, default=20000, help="maximum optimizer steps")
    p.add_argument("--minutes", type=cli.non_negative_float, default=0.0, help="wall-clock budget; stops early (0 = no limit)")
    p.add_argument("--batch", type=cli.positive_int, default=32, help="images per step")
    p.add_argument("--lr", type=cli.positive_float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=cli.non_negative_int, default=200, help="linear warmup steps")
    p.add_argument("--weight-decay", type=cli.non_negative_float, default=0.01, help="AdamW weight decay")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--sigma-sampling", choices=("logit-normal", "uniform"), default="logit-normal",
                   help="distribution of the training noise levels")
    p.add_argument("--cond-dropout", type=float, default=0.1, help="fraction of unconditional ids (for CFG)")
    p.add_argument("--seed", type=cli.non_negative_int, default=0, help="seed of init, data and sigmas")
    p.add_argument("--threads", type=cli.non_negative_int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="cpu",
                   help="torch device to train on, e.g. cuda (the procedural images are drawn on the CPU and moved "
                        "there)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast of the model (default: on a GPU)")
    p.add_argument("--compile", choices=("auto", "off", "inductor", "eager"), default="auto",
                   help="torch.compile backend of the model (auto: inductor on a GPU, off on the CPU; eager traces "
                        "without compiling, for tests)")
    p.add_argument("--workers", type=cli.non_negative_int, default=None,
                   help="background processes drawing the pictures (default: 0 on the CPU, CPUs - 2 up to 12 on a GPU)")
    p.add_argument("--save-every", type=cli.non_negative_int, default=250,
                   help="checkpoint (EMA weights) every N steps (0: only at the end)")
    p.add_argument("--log-every", type=cli.positive_int, default=50, help="print the loss every N steps")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float16",
                   help="storage dtype of the weights file (loaded back as float32)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from this weights file (its weights and config; fresh optimizer, steps add up)")
    p.add_argument("--evaluate", action="store_true", help="evaluate --out instead of training")
    p.add_argument("--grid", type=cli.out_file, default=ROOT / "out" / "reference_samples.png",
                   help="with --evaluate: PNG of samples, one row per class")
    p.add_argument("--probe-steps", type=cli.positive_int, default=400,
                   help="with --evaluate: training steps of the class probe (tools/class_probe.py)")
    p.add_argument("--samples-per-class", type=cli.positive_int, default=12,
                   help="with --evaluate: samples per class the probe names (the grid shows up to 6)")
    p.add_argument("--config", default=None,
                   help="JSON DiTConfig overrides of the --model configuration")
    args = p.parse_args(argv)
    for name in ("ema", "cond_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            p.error(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(args, name)}")
    if args.config is not None:
        try:
            config = config_for(args.model, args.config)
            names = procedural.dataset(config.data).names
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            p.error(f"--config: not a valid DiTConfig in JSON: {e}")
        if config.num_classes != len(names):
            p.error(f"--config: num_classes {config.num_classes} does not match the {len(names)} classes of the "
                    f"{config.data!r} data")
    if args.init_from is not None:
        cli.weights_file(p, args.init_from, "--init-from")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch here")
    cuda = args.device.startswith("cuda")
    if args.evaluate:
        if args.out is None and not R.MODELS[args.model].is_file():
            p.error(f"--evaluate: the {args.model} weights are not trained yet (no {R.MODELS[args.model]}; "
                    "tools/weights/README.md)")
        args.out = args.out or R.MODELS[args.model]
        cli.weights_file(p, args.out, "--evaluate --out")
        cli.writable_file(p, args.grid, "--grid")
    else:
        args.out = args.out or R.MODELS[args.model]
        cli.writable_file(p, args.out)
    args.bf16 = cuda if args.bf16 is None else args.bf16
    if args.compile == "auto":
        args.compile = "inductor" if cuda else "off"
    if args.workers is None:
        args.workers = min(12, max(1, (os.cpu_count() or 2) - 2)) if cuda else 0
    return args


def config_for(model: str, overrides: str | None = None) -> R.DiTConfig:
    """The --model configuration with the JSON `overrides` applied."""
    return R.DiTConfig(**{**dataclasses.asdict(R.MODEL_CONFIGS[model]), **json.loads(overrides or "{}")})


def init_model(config: R.DiTConfig, seed: int) -> R.ReferenceDiT:
    """Seeded init with DiT's zero-init: adaLN modulations and the output layer start at zero,
    so every block starts as the identity and the first prediction is 0."""
    model = R.ReferenceDiT(config).init_weights(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lin." in name or "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.zero_()
    return model


def compile_blocks(model: R.ReferenceDiT, backend: str):
    """Put torch.compile'd blocks in place of the eager ones: the blocks of one kind share the compiled code, so
    compiling costs two blocks' time however deep the model. Returns a function that puts the eager blocks back."""
    eager = model.double_blocks, model.single_blocks
    model.double_blocks, model.single_blocks = (torch.nn.ModuleList(torch.compile(b, backend=backend) for b in blocks)
                                                for blocks in eager)

    def restore():
        model.double_blocks, model.single_blocks = eager
    return restore


def sample_sigmas(n: int, gen: torch.Generator, kind: str) -> torch.Tensor:
    if kind == "uniform":
        return torch.rand(n, generator=gen, device=gen.device)
    return torch.sigmoid(torch.randn(n, generator=gen, device=gen.device))


def corrupt(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, config: R.DiTConfig,
            sigma_sampling="logit-normal", cond_dropout=0.0, sigma: float | None = None):
    """(x_sigma, sigma, class ids, target v) for clean images: noise, sigmas and dropped ids drawn from `gen`,
    which lives on the images' device."""
    n = images.shape[0]
    noise = torch.randn(images.shape, generator=gen, device=gen.device)
    s = sample_sigmas(n, gen, sigma_sampling) if sigma is None else torch.full((n,), float(sigma), device=gen.device)
    drop = torch.rand(n, generator=gen, device=gen.device) < cond_dropout
    ids = torch.where(drop, torch.full_like(labels, config.num_classes), labels)
    sb = s.view(n, 1, 1, 1)
    return (1 - sb) * images + sb * noise, s, ids, noise - images


def flow_batch(n: int, gen: torch.Generator, config: R.DiTConfig, sigma_sampling="logit-normal",
               cond_dropout=0.0, sigma: float | None = None):
    """(x_sigma, sigma, class ids, target v) for n fresh procedural images of the config's data set."""
    images, labels = procedural.dataset(config.data).sample(n, gen, size=config.image_size)
    return corrupt(images, labels, gen, config, sigma_sampling, cond_dropout, sigma)


class PictureStream(torch.utils.data.IterableDataset):
    """Endless batches (images, labels) of a procedural data set; each worker process draws with one thread
    from its own generator."""

    def __init__(self, data: str, batch: int, size: int, seed: int):
        super().__init__()
        self.data, self.batch, self.size, self.seed = data, batch, size, seed

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            torch.set_num_threads(1)
        gen = torch.Generator().manual_seed(self.seed * 1009 + (worker.id if worker else 0))
        sample = procedural.dataset(self.data).sample
        while True:
            yield sample(self.batch, gen, size=self.size)


def picture_batches(args, config: R.DiTConfig, gen: torch.Generator, seed: int):
    """Batches (images, labels) on the CPU: drawn here from `gen` (no workers: noise and sigmas follow from the
    same generator, one reproducible stream), or by background worker processes (pinned for a GPU)."""
    if not args.workers:
        sample = procedural.dataset(config.data).sample
        return (sample(args.batch, gen, size=config.image_size) for _ in itertools.count())
    loader = torch.utils.data.DataLoader(PictureStream(config.data, args.batch, config.image_size, seed),
                                         batch_size=None, num_workers=args.workers, prefetch_factor=4,
                                         pin_memory=args.device.startswith("cuda"), persistent_workers=True)
    return iter(loader)


@torch.no_grad()
def velocity_errors(models: list, sigma: float, n: int = 64, seed: int = 12345, batch: int = 32) -> list[float]:
    """Mean squared velocity error of each model, then of the zero predictor (v = 0), on the same n held-out
    procedural images (class-conditional, drawn on the CPU) at one sigma."""
    config = models[0].config
    gen = torch.Generator().manual_seed(seed)
    totals = [0.0] * (len(models) + 1)
    for start in range(0, n, batch):
        x, s, ids, v = flow_batch(min(batch, n - start), gen, config, sigma=sigma)
        for i, m in enumerate(models):
            dev = next(m.parameters()).device
            out = m(x.to(dev), s.to(dev), ids.to(dev)).float().cpu()
            totals[i] += F.mse_loss(out, v, reduction="sum").item()
        totals[-1] += v.pow(2).sum().item()
    return [t / (n * config.channels * config.image_size ** 2) for t in totals]


def velocity_mse(model: R.ReferenceDiT, sigma: float, n: int = 64, seed: int = 12345, batch: int = 32) -> float:
    """Mean squared velocity error on n held-out procedural images (class-conditional) at one sigma."""
    return velocity_errors([model], sigma, n, seed, batch)[0]


def lr_at(step: int, progress: float, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}".strip()


def save(ema: R.ReferenceDiT, args, command: str, step: int, loss: float, elapsed: float, final: bool,
         prior: dict | None = None, extra: dict | None = None):
    prior = prior or {}
    if prior:  # a continued run: the commands chain, steps and seconds add up
        command = f"{prior.get('command', '?')} && {command}"
        step += int(prior.get("steps", 0))
        elapsed += float(prior.get("train_seconds", 0))
    meta = {"command": command, "seed": str(args.seed), "steps": str(step), "final_loss": f"{loss:.5f}",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "train_seconds": f"{elapsed:.0f}", "batch": str(args.batch), "lr": str(args.lr),
            "sigma_sampling": args.sigma_sampling, "cond_dropout": str(args.cond_dropout),
            "ema": str(args.ema), "complete": str(final).lower(), "torch": torch.__version__, "device": args.device,
            "device_name": device_name(torch.device(args.device)), "threads": str(torch.get_num_threads()),
            "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
            "data": f"tools/procedural.py {procedural.dataset(ema.config.data).sample.__name__}",
            "bf16": str(args.bf16).lower(), "workers": str(args.workers), **(extra or {})}
    R.save_weights(ema, args.out, metadata=meta, dtype=getattr(torch, args.dtype))


def evaluate(args) -> dict:
    """Print the velocity MSE of the weights in args.out at several sigmas next to the same architecture at
    random init and the zero predictor, and how many of its samples a class probe names as their class,
    with the verdict against the bar (GOOD_PROBE, GOOD_VELOCITY); write a grid of samples per class."""
    from tools import class_probe, demo
    device = torch.device(args.device)
    model = R.load_weights(args.out).to(device)
    config = model.config
    random_init = R.ReferenceDiT(config).init_weights(args.seed).eval().to(device)
    meta = R.weights_metadata(args.out)
    print(f"{args.out}: steps {meta.get('steps')}, final loss {meta.get('final_loss')}, date {meta.get('date')}, "
          f"trained on {meta.get('device_name', meta.get('device', '?'))}")
    print("| sigma | trained | random init | zero predictor |\n|---|---|---|---|")
    table = {}
    for sigma in SIGMAS:
        row = tuple(velocity_errors([model, random_init], sigma))
        table[sigma] = row
        print(f"| {sigma} | {row[0]:.4f} | {row[1]:.4f} | {row[2]:.4f} |", flush=True)

    names = procedural.dataset(config.data).names
    probe = class_probe.train_probe(config.data, config.image_size, steps=args.probe_steps, seed=args.seed,
                                    device=device)
    ceiling = class_probe.real_accuracy(probe, config.data, config.image_size)
    k = args.samples_per_class
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        rows = [R.sample(model, [c] * k, steps=16, cfg=3.0, seed=100 + c, device=device).float().cpu()
                for c in range(config.num_classes)]
    per_class = [class_probe.accuracy(probe, images, [c] * k) for c, images in enumerate(rows)]
    probe_acc = sum(per_class) / len(per_class)
    print(f"class probe: {probe_acc:.0%} of the samples named as their class ({k} per class, 16 Euler steps, CFG 3); "
          f"on real pictures {ceiling:.0%}; chance {1 / len(names):.0%}")
    print("per class: " + ", ".join(f"{n} {a:.0%}" for n, a in zip(names, per_class)))
    worst = max(table[s][0] / table[s][2] for s in MIDDLE_SIGMAS)
    good = probe_acc >= GOOD_PROBE and worst < GOOD_VELOCITY
    print(f"{'GOOD ENOUGH' if good else 'NOT YET'}: the bar is a class probe accuracy of at least {GOOD_PROBE:.0%} "
          f"(here {probe_acc:.0%}) and a velocity error at sigma {', '.join(map(str, MIDDLE_SIGMAS))} below "
          f"{GOOD_VELOCITY:.0%} of the zero predictor's (here at most {worst:.1%})")
    demo.write_png(args.grid, demo.side_by_side([r[:6] for r in rows], scale=max(1, 128 // config.image_size), pad=2))
    print(f"wrote {args.grid}: one row per class ({', '.join(names)}), 16 Euler steps, CFG 3")
    return {"table": table, "probe": probe_acc, "probe_real": ceiling, "per_class": per_class, "good": good}


def train(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.evaluate:
        return evaluate(args)
    command = "python tools/train_reference.py " + " ".join(shlex.quote(a) for a in
                                                             (sys.argv[1:] if argv is None else argv))
    config = config_for(args.model, args.config)
    torch.manual_seed(args.seed)
    prior = {}
    if args.init_from is not None:
        prior = R.weights_metadata(args.init_from)
        model = R.load_weights(args.init_from).train()
        config = model.config
    else:
        model = init_model(config, args.seed).train()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:  # flash (or memory-efficient) attention only, never the math kernel's L x L matrices
        torch.backends.cuda.enable_math_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "class_" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99),
                            fused=cuda or None)
    seed = args.seed + 1 + int(prior.get("steps", 0))
    gen = torch.Generator().manual_seed(seed)
    batches = picture_batches(args, config, gen, seed)
    noise_gen = gen if not args.workers else torch.Generator(device).manual_seed(seed)
    uncompile = (lambda: None) if args.compile == "off" else compile_blocks(model, args.compile)
    compiled = args.compile
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config {config.to_json()}\n{n_params:,} parameters; {device_name(device)}; bf16 {args.bf16}, compile "
          f"{args.compile}, {args.workers} data workers; {command}", flush=True)

    def train_step(images, labels):
        x, s, ids, v = corrupt(images, labels, noise_gen, config, args.sigma_sampling, args.cond_dropout)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.mse_loss(model(x, s, ids).float(), v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    t0 = time.perf_counter()
    budget = args.minutes * 60.0
    step, loss_avg, losses, pending, waited = 0, None, [], [], 0.0

    def flush():  # the losses of the steps since the last read (one device sync)
        nonlocal loss_avg
        if pending:
            losses.extend(torch.stack(pending).float().cpu().tolist())
            pending.clear()
            loss_avg = sum(losses[-100:]) / len(losses[-100:])

    while step < args.steps:
        elapsed = time.perf_counter() - t0
        if budget and elapsed >= budget:
            break
        progress = max(step / args.steps, elapsed / budget if budget else 0.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress, args)
        t_wait = time.perf_counter()
        images, labels = (t.to(device, non_blocking=True) for t in next(batches))
        waited += time.perf_counter() - t_wait
        try:
            loss = train_step(images, labels)
        except Exception as e:  # a compiler that fails costs the run its speed, not the run
            if compiled in ("off", "failed"):
                raise
            print(f"torch.compile ({compiled}) failed, training eager: {type(e).__name__}: "
                  f"{(str(e).strip().splitlines() or [''])[0][:200]}", flush=True)
            uncompile()
            compiled = "failed"
            loss = train_step(images, labels)
        pending.append(loss)
        step += 1
        torch._foreach_lerp_(ema_params, model_params, 1 - min(args.ema, (1 + step) / (10 + step)))
        if step % args.log_every == 0 or step == 1:
            flush()
            el = time.perf_counter() - t0
            print(f"step {step:6d}  loss {losses[-1]:.4f}  avg100 {loss_avg:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{el:6.0f} s  {step * args.batch / max(el, 1e-9):.1f} img/s  "
                  f"waited for data {100 * waited / el:.0f}%", flush=True)
        if args.save_every and step % args.save_every == 0:
            flush()
            save(ema, args, command, step, loss_avg, time.perf_counter() - t0, final=False, prior=prior,
                 extra={"compile": compiled})
    flush()
    uncompile()
    elapsed = time.perf_counter() - t0
    rate = step * args.batch / max(elapsed, 1e-9)
    save(ema, args, command, step, loss_avg if loss_avg is not None else float("nan"), elapsed, final=True,
         prior=prior, extra={"compile": compiled, "images_per_second": f"{rate:.0f}"})
    peak = f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB" if cuda else ""
    print(f"done: {step} steps in {elapsed:.0f} s ({rate:.0f} img/s, waited for data {100 * waited / elapsed:.0f}%"
          f"{peak}), final loss (mean of last 100) {loss_avg:.4f}; wrote {args.out}", flush=True)
    return {"steps": step, "losses": losses, "final_loss": loss_avg, "model": model, "ema": ema, "compile": compiled}


if __name__ == "__main__":
    train()

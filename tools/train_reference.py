"""Train the embedded reference DiT (tools/reference_dit.py) on procedural images (tools/procedural.py).

    python tools/train_reference.py --minutes 45 --threads 2            # writes tools/weights/reference_dit.safetensors
    python tools/train_reference.py --steps 20 --batch 8 --out /tmp/w.safetensors   # smoke test
    python tools/train_reference.py --evaluate [--out W] [--grid out/reference_samples.png]
        # velocity error vs. random init and the zero predictor, and a PNG of samples per class

Rectified-flow matching: x_sigma = (1 - sigma) * image + sigma * noise, target v = noise - image,
MSE loss. sigma is logit-normal (SD3's default, mean 0, std 1) or uniform. 10% of the class ids
are replaced by the unconditional id (config.num_classes) so that CFG works. AdamW with linear
warmup, then cosine decay over the run's progress: the larger of step / --steps and elapsed /
--minutes, so a wall-clock-limited run still ends at the low learning rate. An EMA of the weights
is what gets saved (every --save-every steps and at the end), with the config, the command, seed,
steps done, final loss and date in the safetensors metadata.

Data and sigmas come from one seeded torch.Generator, so a run given --steps alone (no --minutes)
is reproducible on the same torch build and thread count.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tools import cli, procedural  # noqa: E402
from tools import reference_dit as R  # noqa: E402

# The trained configuration: 64x64 px with 4x4 patches -> a 16x16 token grid (256 image tokens).
# Patch 2 (1024 tokens) trains ~18x slower on a CPU; see tools/weights/README.md.
TRAIN_CONFIG = dict(image_size=64, patch_size=4, hidden=128, heads=2, depth_double=2, depth_single=4,
                    num_classes=procedural.NUM_CLASSES, axes_dim=(16, 24, 24))


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=cli.out_file, default=R.WEIGHTS_PATH, help="weights file to write (EMA weights)")
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
                   help="torch device to train on, e.g. cuda (the procedural images are drawn on the CPU, with "
                        "the same seeds, and moved there)")
    p.add_argument("--save-every", type=cli.non_negative_int, default=250,
                   help="checkpoint (EMA weights) every N steps (0: only at the end)")
    p.add_argument("--log-every", type=cli.positive_int, default=50, help="print the loss every N steps")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float16",
                   help="storage dtype of the weights file (loaded back as float32)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from this weights file (its weights and config; fresh optimizer, steps add up)")
    p.add_argument("--evaluate", action="store_true", help="evaluate --out instead of training")
    p.add_argument("--grid", type=cli.out_file, default=ROOT / "out" / "reference_samples.png",
                   help="with --evaluate: PNG of samples, one row per class")
    p.add_argument("--config", default=None,
                   help="JSON DiTConfig overrides (default: the shipped 64 px / patch 4 / hidden 128 config)")
    args = p.parse_args(argv)
    for name in ("ema", "cond_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            p.error(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(args, name)}")
    if args.config is not None:
        try:
            overrides = json.loads(args.config)
            R.DiTConfig(**{**TRAIN_CONFIG, **overrides})
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            p.error(f"--config: not a valid DiTConfig in JSON: {e}")
    if args.init_from is not None:
        cli.weights_file(p, args.init_from, "--init-from")
    if args.evaluate:
        cli.weights_file(p, args.out, "--evaluate --out")
        cli.writable_file(p, args.grid, "--grid")
    else:
        cli.writable_file(p, args.out)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch here")
    return args


def init_model(config: R.DiTConfig, seed: int) -> R.ReferenceDiT:
    """Seeded init with DiT's zero-init: adaLN modulations and the output layer start at zero,
    so every block starts as the identity and the first prediction is 0."""
    model = R.ReferenceDiT(config).init_weights(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lin." in name or "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.zero_()
    return model


def sample_sigmas(n: int, gen: torch.Generator, kind: str) -> torch.Tensor:
    if kind == "uniform":
        return torch.rand(n, generator=gen)
    return torch.sigmoid(torch.randn(n, generator=gen))


def flow_batch(n: int, gen: torch.Generator, config: R.DiTConfig, sigma_sampling="logit-normal",
               cond_dropout=0.0, sigma: float | None = None):
    """(x_sigma, sigma, class ids, target v) for n fresh procedural images."""
    images, labels = procedural.sample_batch(n, gen, size=config.image_size)
    noise = torch.randn(images.shape, generator=gen)
    s = torch.full((n,), float(sigma)) if sigma is not None else sample_sigmas(n, gen, sigma_sampling)
    drop = torch.rand(n, generator=gen) < cond_dropout
    ids = torch.where(drop, torch.full_like(labels, config.num_classes), labels)
    sb = s.view(n, 1, 1, 1)
    return (1 - sb) * images + sb * noise, s, ids, noise - images


@torch.no_grad()
def velocity_mse(model: R.ReferenceDiT, sigma: float, n: int = 64, seed: int = 12345, batch: int = 32) -> float:
    """Mean squared velocity error on n held-out procedural images (class-conditional) at one sigma."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for start in range(0, n, batch):
        x, s, ids, v = flow_batch(min(batch, n - start), gen, model.config, sigma=sigma)
        total += F.mse_loss(model(x, s, ids), v, reduction="sum").item()
    return total / (n * model.config.channels * model.config.image_size ** 2)


def lr_at(step: int, progress: float, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def save(ema: R.ReferenceDiT, args, command: str, step: int, loss: float, elapsed: float, final: bool,
         prior: dict | None = None):
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
            "threads": str(torch.get_num_threads()),
            "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
            "data": "tools/procedural.py sample_batch"}
    R.save_weights(ema, args.out, metadata=meta, dtype=getattr(torch, args.dtype))


def evaluate(args) -> dict:
    """Print the velocity MSE of the weights in args.out at several sigmas next to the same
    architecture at random init and the zero predictor; write a grid of samples per class."""
    from tools import demo
    model = R.load_weights(args.out)
    random_init = R.ReferenceDiT(model.config).init_weights(args.seed).eval()
    meta = R.weights_metadata(args.out)
    print(f"{args.out}: steps {meta.get('steps')}, final loss {meta.get('final_loss')}, date {meta.get('date')}")
    print("| sigma | trained | random init | zero predictor |\n|---|---|---|---|")
    table = {}
    for sigma in (0.1, 0.3, 0.5, 0.7, 0.9):
        gen = torch.Generator().manual_seed(12345)
        _, _, _, v = flow_batch(64, gen, model.config, sigma=sigma)
        row = (velocity_mse(model, sigma), velocity_mse(random_init, sigma), v.pow(2).mean().item())
        table[sigma] = row
        print(f"| {sigma} | {row[0]:.4f} | {row[1]:.4f} | {row[2]:.4f} |")
    per_class = 6
    rows = [R.sample(model, [c] * per_class, steps=16, cfg=3.0, seed=100 + c) for c in range(model.config.num_classes)]
    demo.write_png(args.grid, demo.side_by_side(rows, scale=2, pad=2))
    print(f"wrote {args.grid}: one row per class ({', '.join(procedural.CLASS_NAMES)}), 16 Euler steps, CFG 3")
    return table


def train(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.evaluate:
        return evaluate(args)
    command = "python tools/train_reference.py " + " ".join(shlex.quote(a) for a in
                                                             (sys.argv[1:] if argv is None else argv))
    overrides = TRAIN_CONFIG if args.config is None else {**TRAIN_CONFIG, **json.loads(args.config)}
    config = R.DiTConfig(**overrides)
    torch.manual_seed(args.seed)
    prior = {}
    if args.init_from is not None:
        prior = R.weights_metadata(args.init_from)
        model = R.load_weights(args.init_from).train()
        config = model.config
    else:
        model = init_model(config, args.seed).train()
    device = torch.device(args.device)
    model = model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "class_" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed + 1 + int(prior.get("steps", 0)))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config {config.to_json()}\n{n_params:,} parameters; {command}", flush=True)
    t0 = time.perf_counter()
    budget = args.minutes * 60.0
    step, loss_avg, losses = 0, None, []
    while step < args.steps:
        elapsed = time.perf_counter() - t0
        if budget and elapsed >= budget:
            break
        progress = max(step / args.steps, elapsed / budget if budget else 0.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress, args)
        x, s, ids, v = (t.to(device) for t in flow_batch(args.batch, gen, config, args.sigma_sampling,
                                                        args.cond_dropout))
        loss = F.mse_loss(model(x, s, ids), v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        losses.append(loss.item())
        loss_avg = sum(losses[-100:]) / len(losses[-100:])
        if step % args.log_every == 0 or step == 1:
            el = time.perf_counter() - t0
            print(f"step {step:6d}  loss {losses[-1]:.4f}  avg100 {loss_avg:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{el:6.0f} s  {step * args.batch / max(el, 1e-9):.1f} img/s", flush=True)
        if args.save_every and step % args.save_every == 0:
            save(ema, args, command, step, loss_avg, time.perf_counter() - t0, final=False, prior=prior)
    elapsed = time.perf_counter() - t0
    save(ema, args, command, step, loss_avg if loss_avg is not None else float("nan"), elapsed, final=True,
         prior=prior)
    print(f"done: {step} steps in {elapsed:.0f} s, final loss (mean of last 100) {loss_avg:.4f}; wrote {args.out}",
          flush=True)
    return {"steps": step, "losses": losses, "final_loss": loss_avg, "model": model, "ema": ema}


if __name__ == "__main__":
    train()

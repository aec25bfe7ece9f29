"""Demo: the same pictures from the embedded reference DiT, unpatched, with each method, with a plain step
cache and with fewer steps.

    python tools/demo.py [--out DIR] [--model 128px|64px|256px] [--steps N] [--classes 4,5,6] [--seed S]

Runs without ComfyUI, in seconds on a CPU. Each method runs at its node's default preset. Writes
DIR/demo_side_by_side.png (one labelled row per setting: FLOPs of the transformer blocks relative to
unpatched, PSNR against the unpatched picture of the same seed and class, and the token-scale
artifact ratio, 1 = as unpatched, above 1 = per-token noise) and DIR/demo_table.md, and prints both
with a one-line recommendation drawn from what was measured.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import struct  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kernels.draw import draw_text, text_width  # noqa: E402
from kernels.runtime import RUNS_KEY  # noqa: E402
from kernels.methods import SPECS  # noqa: E402
from tools import cli, metrics, procedural, step_cache  # noqa: E402
from tools import reference_dit as R  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as an 8-bit RGB PNG (zlib + struct, no PIL)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got {rgb.shape}")
    h, w, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)  # filter byte 0 per row
    return (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)) + chunk(b"IEND", b""))


def write_png(path, rgb: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(rgb))
    return path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def side_by_side(rows: list[torch.Tensor], scale: int = 4, pad: int = 4) -> np.ndarray:
    """Rows of images -> one canvas, each image nearest-upscaled by `scale`, on a white background."""
    rows = [to_uint8(r).repeat(scale, axis=1).repeat(scale, axis=2) for r in rows]
    n, h, w, _ = rows[0].shape
    canvas = np.full((pad + len(rows) * (h + pad), pad + n * (w + pad), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = img
    return canvas


@dataclass
class Row:
    name: str
    images: torch.Tensor
    flops: float       # block FLOPs relative to the unpatched run
    seconds: float
    psnr: float = float("inf")
    artifacts: float = 1.0

    def label(self) -> list[str]:
        return [self.name, f"FLOPS {self.flops:.2f}X", f"PSNR {self.psnr:.1f} DB" if self.psnr != float("inf")
                else "REFERENCE", f"ARTIFACTS {self.artifacts:.2f}"]


def wrap(text: str, width: int, scale: int) -> list[str]:
    """`text` in lines no wider than `width` pixels: whole words where they fit, a longer word cut across lines."""
    per_line = max(1, (width + scale) // (4 * scale))  # characters of the 3x5 font (4 columns each) in `width`
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(lines[-1] + " " + word, scale) <= width:
            lines[-1] += " " + word
        else:
            lines += [word[i:i + per_line] for i in range(0, len(word), per_line)]
    return lines


def labelled(rows: list[Row], titles: list[str], headline: str, footer: str, scale: int, pad: int = 6) -> np.ndarray:
    """The images of each row with its label on the left, class names above, headline and footer; every text
    wraps inside the picture, whose width the images and their labels set."""
    text, gap = 2, 3 * 2  # font scale, line height extra
    line_h = 5 * text + gap
    grid = side_by_side([r.images for r in rows], scale=scale, pad=pad)
    tile = rows[0].images.shape[-1] * scale
    label_w = max(text_width(line, text) for r in rows for line in r.label()) + 2 * pad
    w = label_w + grid.shape[1]
    head, foot = wrap(headline, w - 2 * pad, text), wrap(footer, w - 2 * pad, text)
    wrapped = [wrap(t, tile, text) for t in titles]
    top = pad + (len(head) + max(len(t) for t in wrapped)) * line_h
    h = top + grid.shape[0] + len(foot) * line_h + pad
    canvas = torch.ones(h, w, 3)
    canvas[top:top + grid.shape[0], label_w:] = torch.from_numpy(grid).float() / 255
    ink = (0.1, 0.1, 0.1)
    for k, line in enumerate(head):
        draw_text(canvas, line, pad, pad + k * line_h, text, ink)
    for j, title in enumerate(wrapped):
        x = label_w + pad + j * (tile + pad)
        for k, line in enumerate(title):
            draw_text(canvas, line, x, top - (len(title) - k) * line_h, text, ink)
    for i, r in enumerate(rows):
        y = top + pad + i * (tile + pad)
        for k, line in enumerate(r.label()):
            draw_text(canvas, line, pad, y + k * line_h, text, ink)
    for k, line in enumerate(foot):
        draw_text(canvas, line, pad, top + grid.shape[0] + k * line_h, text, ink)
    return (canvas * 255).round().to(torch.uint8).numpy()


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=cli.out_dir, default=ROOT / "out", help="output folder (default: <repo>/out)")
    p.add_argument("--model", choices=sorted(R.MODELS), default="128px", help="which trained reference model")
    p.add_argument("--steps", type=cli.positive_int, default=10, help="Euler sampling steps (at least 4)")
    p.add_argument("--classes", type=cli.int_list, default=[4, 5, 6],
                   help="comma-separated class ids, one picture each (default: the classes the models draw best: "
                        "horizontal stripes, vertical stripes, checkerboard)")
    p.add_argument("--seed", type=cli.non_negative_int, default=0, help="noise seed")
    p.add_argument("--cfg", type=cli.non_negative_float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--scale", type=cli.positive_int, default=None, help="upscale factor of the PNG (default: to 128 px)")
    p.add_argument("--threads", type=cli.non_negative_int, default=1, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.steps < 4:
        p.error(f"--steps must be at least 4 (a method needs steps to skip), got {args.steps}")
    names = procedural.dataset(R.MODEL_CONFIGS[args.model].data).names
    bad = [c for c in args.classes if not 0 <= c < len(names)]
    if bad:
        p.error(f"--classes: {', '.join(map(str, bad))} outside 0..{len(names) - 1} "
                f"({', '.join(f'{i} {n}' for i, n in enumerate(names))})")
    if not R.MODELS[args.model].is_file():
        p.error(f"--model {args.model}: the {args.model} weights are not trained yet (no {R.MODELS[args.model]}; "
                "tools/weights/README.md)")
    cli.weights_file(p, R.MODELS[args.model], f"--model {args.model}")
    cli.writable_dir(p, args.out)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with cli.torch_threads(args.threads):
        return run(args)


def run(args) -> dict:
    t_start = time.perf_counter()
    model = R.load_weights(R.MODELS[args.model])
    cfg = model.config
    patch_px = cfg.patch_size
    kw = dict(cfg=args.cfg, seed=args.seed)

    def sample(steps, options=None):
        t0 = time.perf_counter()
        images = R.sample(model, args.classes, steps=steps, transformer_options=options, **kw)
        return images, (time.perf_counter() - t0) / len(args.classes)

    images, seconds = sample(args.steps)
    rows = [Row("UNPATCHED", images, 1.0, seconds)]
    for spec in SPECS:  # every node at its default preset
        options = R.method_options(spec.build(), model, "demo")
        images, seconds = sample(args.steps, options)
        rows.append(Row(spec.name.upper(), images, options[RUNS_KEY]["demo"].stats.flops_share(), seconds))
    # What a user could do instead: fewer steps at about the FLOPs the methods spend, and a plain step cache
    # (CAT at ratio 1: its full steps, nothing computed between them).
    k = max(1, round(args.steps * sorted(r.flops for r in rows[1:])[len(rows[1:]) // 2]))
    options = R.method_options(step_cache.through_the_runtime(), model, "demo")
    images, seconds = sample(args.steps, options)
    rows.append(Row("STEP CACHE, NO TOKEN WORK", images, options[RUNS_KEY]["demo"].stats.flops_share(), seconds))
    images, seconds = sample(k)
    rows.append(Row(f"{k} STEPS, NOT {args.steps}", images, k / args.steps, seconds))
    base = rows[0].images
    for r in rows[1:]:
        r.psnr = R.psnr(r.images, base)
        r.artifacts = metrics.token_artifact_ratio(r.images, base, patch_px)

    methods = rows[1:1 + len(SPECS)]
    clean = [r for r in methods if r.artifacts <= 1.25] or methods
    best = max(clean, key=lambda r: r.psnr)
    fewer = rows[-1]
    close = [r for r in clean if best.psnr - r.psnr <= 1.0]  # within 1 dB: no method to single out
    against = f"{fewer.name.lower()} ({fewer.psnr:.1f} DB AT {fewer.flops:.2f}X)"
    if len(close) > 1:
        names = ", ".join(r.name for r in close[:-1]) + " AND " + close[-1].name
        verdict = "ALL BEAT" if all(r.psnr > fewer.psnr for r in close) else "NOT ALL BEAT"
        recommendation = (f"{names} STAY WITHIN {best.psnr - min(r.psnr for r in close):.1f} DB OF EACH OTHER "
                          f"AT {min(r.flops for r in close):.2f}-{max(r.flops for r in close):.2f}X FLOPS, "
                          f"{verdict} {against}")
    else:
        verdict = "BEATS" if best.psnr > fewer.psnr else "DOES NOT BEAT"
        recommendation = f"{best.name} KEEPS CLOSEST TO UNPATCHED AT {best.flops:.2f}X FLOPS AND {verdict} {against}"
    headline = (f"REFERENCE DIT {cfg.image_size} PX, {args.steps} STEPS, CFG {args.cfg:g}, SEED {args.seed}")
    titles = [procedural.dataset(cfg.data).names[c].upper() for c in args.classes]
    scale = args.scale or max(1, 128 // cfg.image_size)
    out = Path(args.out)
    png = write_png(out / "demo_side_by_side.png", labelled(rows, titles, headline, recommendation, scale))

    table = ["| setting | block FLOPs / unpatched | seconds / image | PSNR vs unpatched | token artifact ratio |",
             "|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r.name.lower()} | {r.flops:.3f} | {r.seconds:.3f} | "
                     + ("reference" if r.psnr == float("inf") else f"{r.psnr:.2f} dB") + f" | {r.artifacts:.2f} |")
    notes = (f"Reference DiT {args.model} ({R.MODELS[args.model].name}); classes {args.classes} "
             f"({', '.join(t.lower() for t in titles)}); {args.steps} Euler steps, CFG {args.cfg:g}, seed {args.seed}; "
             f"{torch.get_num_threads()} torch threads. Methods at their nodes' default preset. "
             f"Recommendation: {recommendation.lower()}.")
    (out / "demo_table.md").write_text("\n".join(table) + "\n\n" + notes + "\n")
    print("\n".join(table))
    print()
    print(notes)
    print(f"wrote {png} and {out / 'demo_table.md'} in {time.perf_counter() - t_start:.1f} s")
    return {"png": png, "rows": rows, "recommendation": recommendation}


if __name__ == "__main__":
    main()

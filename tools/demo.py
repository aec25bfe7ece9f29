"""Demo: class-conditioned images from the embedded reference DiT, unpatched, with SDTM and with CAT.

    python tools/demo.py [--out DIR] [--steps N] [--seed S] [--classes 0,1,2,3] [--cfg G]
                         [--repeats R] [--size PX] [--scale K] [--random-init]
                         [--threads T]

Runs without ComfyUI. SDTM and CAT run at their nodes' defaults (kernels.sdtm.SDTMConfig(),
kernels.cat.CATConfig()). Writes DIR/demo_side_by_side.png (rows: baseline, SDTM, CAT; nearest-upscaled)
and DIR/demo_table.md, and prints the table: FLOPs per image over one full sampling
run (torch.utils.flop_counter; CFG's unconditional half included), median wall time of R timed runs (interleaved with
the baseline's, so both see the same machine load), and the difference to the
baseline images (PSNR, max abs error, on images in [-1, 1]).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kernels.runtime import RUNS_KEY  # noqa: E402
from kernels.cat import CATConfig, CATPruning  # noqa: E402
from kernels.sdtm import SDTM, SDTMConfig  # noqa: E402
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "out", help="output folder (default: <repo>/out)")
    p.add_argument("--steps", type=int, default=8, help="Euler sampling steps")
    p.add_argument("--seed", type=int, default=0, help="noise seed (and random-init seed)")
    p.add_argument("--classes", default="0,1,2,3", help="comma-separated class ids, one image each")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--scale", type=int, default=4, help="nearest upscale factor of the PNG")
    p.add_argument("--random-init", action="store_true", help="ignore trained weights, use seeded random init")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: steady timings even on a CPU shared with other jobs, "
                        "where several threads each stall badly; 0 = torch's default)")
    return p.parse_args(argv)


def _runner(model, classes, args, size, options_factory):
    """run(count_flops) -> (images, FLOPs per image or wall seconds, transformer_options).

    The counted run samples the first class alone: every batch row merges the same
    number of tokens, so FLOPs per image do not depend on the batch, and that full
    sampling run under FlopCounterMode is also the warm-up.
    """
    def run(count_flops=False):
        to = options_factory()
        kw = dict(steps=args.steps, cfg=args.cfg, seed=args.seed, size=size, transformer_options=to)
        if count_flops:
            with R.flop_counter() as fc:
                out = R.sample(model, classes[:1], **kw)
            return out, fc.get_total_flops(), to
        t0 = time.perf_counter()
        out = R.sample(model, classes, **kw)
        return out, time.perf_counter() - t0, to
    return run


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, t_start)
    finally:
        torch.set_num_threads(threads_before)


def _main(args, t_start) -> dict:
    classes = [int(c) for c in args.classes.split(",") if c.strip()]
    model, source = R.build_model(seed=args.seed, weights=None if args.random_init else R.WEIGHTS_PATH)
    cfg = model.config
    size = args.size or cfg.image_size
    if any(not (0 <= c < cfg.num_classes) for c in classes):
        raise SystemExit(f"class ids must lie in [0, {cfg.num_classes})")
    sdtm_config, cat_config = SDTMConfig(), CATConfig()
    n_img = (size // cfg.patch_size) ** 2
    print(f"reference DiT: {source}")
    print(f"  {cfg.depth_double} double + {cfg.depth_single} single blocks, hidden {cfg.hidden}, {cfg.heads} heads; "
          f"{size}x{size} RGB -> {n_img} image + {cfg.txt_len} text tokens; {len(classes)} images, "
          f"{args.steps} Euler steps, CFG {args.cfg}, seed {args.seed}, torch threads {torch.get_num_threads()}")
    print(f"  SDTM at the node defaults: {sdtm_config}")
    print(f"  CAT at the node defaults: {cat_config}")

    # name -> (runner, method key of its RunStats)
    settings = {
        "baseline": (_runner(model, classes, args, size, lambda: None), None),
        "SDTM": (_runner(model, classes, args, size, lambda: R.method_options(SDTM(sdtm_config), model, "sdtm")),
                 "sdtm"),
        "CAT": (_runner(model, classes, args, size, lambda: R.method_options(CATPruning(cat_config), model, "cat")),
                "cat"),
    }
    res = {name: {"times": []} for name in settings}
    for name, (run, _) in settings.items():
        _, flops, _ = run(count_flops=True)
        res[name]["flops"] = flops
    for _ in range(max(args.repeats, 1)):
        for name, (run, key) in settings.items():  # interleaved: all see the same load
            images, dt, to = run()
            res[name]["times"].append(dt)
            if key is not None:
                res[name]["stats"] = to[RUNS_KEY][key].stats
            if "images" not in res[name]:
                res[name]["images"] = images
            elif not torch.equal(images, res[name]["images"]):
                raise RuntimeError(f"{name}: repeated run differs from the first (non-deterministic sampling)")

    base = res["baseline"]
    n = len(classes)
    rows = ["| setting | GFLOPs / image | FLOPs vs baseline | image tokens computed | wall time (median) "
            "| time vs baseline | PSNR vs baseline | max abs err |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        r["time"] = statistics.median(r["times"])
        r["flops_ratio"] = r["flops"] / base["flops"]
        r["time_ratio"] = r["time"] / base["time"]
        r["psnr"] = R.psnr(r["images"], base["images"])
        r["max_abs_err"] = (r["images"].clamp(-1, 1) - base["images"].clamp(-1, 1)).abs().max().item()
        st = r.get("stats")
        r["tokens_computed"] = 1.0 if st is None else st.tokens_computed / st.tokens_in
        rows.append(f"| {name} | {r['flops'] / 1e9:.2f} | {r['flops_ratio']:.3f} | {100 * r['tokens_computed']:.1f}% "
                    f"| {r['time']:.3f} s | {r['time_ratio']:.3f} | "
                    + ("inf dB" if r["psnr"] == float("inf") else f"{r['psnr']:.2f} dB")
                    + f" | {r['max_abs_err']:.4f} |")
    table = "\n".join(rows)

    out = Path(args.out)
    png = write_png(out / "demo_side_by_side.png",
                    side_by_side([r["images"] for r in res.values()], scale=max(args.scale, 1)))
    notes = (f"Reference DiT ({source}); {n} images of {size}x{size} px, classes {classes}, {args.steps} steps, "
             f"CFG {args.cfg}, seed {args.seed}; wall time = median of {max(args.repeats, 1)} runs on "
             f"{torch.get_num_threads()} torch threads. PSNR and max abs error on images in [-1, 1].")
    (out / "demo_table.md").write_text(table + "\n\n" + notes + "\n")
    print()
    print(table)
    print()
    print(notes)
    for name, r in res.items():
        if "stats" in r:
            print(r["stats"].summary(name))
    print(f"wrote {png} (rows: {', '.join(res)}) and {out / 'demo_table.md'} "
          f"in {time.perf_counter() - t_start:.1f} s")
    return {"png": png, "table": table, "source": source,
            "results": {k: {kk: vv for kk, vv in v.items() if kk not in ("images", "stats")} for k, v in res.items()}}


if __name__ == "__main__":
    main()

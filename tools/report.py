"""Shared by the measuring tools: the markdown report, the machine's name, syncs and CPU peak memory."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch


class Report:
    """Lines printed as they come and kept, to write the whole report to a file at the end."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, text: str = ""):
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list]):
        self("| " + " | ".join(header) + " |")
        self("|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            self("| " + " | ".join(str(c) for c in r) + " |")
        self()

    def header(self, title: str, device: str, tool: str, argv: list[str]):
        """Title, machine, torch, date and the exact command: every measured table says where it was made."""
        self(f"# {title}")
        self()
        self(f"- Machine: {machine(device)}; {platform.system()} {platform.machine()}; torch {torch.__version__}")
        self(f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
        self(f"- Command: `python {tool}{' ' + shlex.join(argv) if argv else ''}`")
        self()

    def write(self, path: Path | None, data=None):
        """The report to `path` (None: nowhere), and `data` (if given) as JSON beside it, for tools/docs.py."""
        if path is not None:
            path.write_text("\n".join(self.lines) + "\n")
            if data is not None:
                path.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(0)}"
    return f"CPU {cpu_name()}, {torch.get_num_threads()} torch threads ({os.cpu_count()} cores)"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def quiet_stderr():
    """Silence what native code writes to stderr (the profiler's `USDT:` lines), then restore it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn) -> int:
    """Peak of the running sum of tensor allocations minus frees that torch.profiler records while fn()
    runs (CPU, op granularity); memory held before the call is not counted."""
    from torch.profiler import ProfilerActivity, profile
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    cur = peak = 0
    for _, d in deltas:
        cur += d
        peak = max(peak, cur)
    return peak


def peak_memory(fn, device: str) -> int:
    """Peak memory of fn() above what was held before: CUDA's allocator, or the CPU profiler's count."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - held
    return cpu_peak_bytes(fn)

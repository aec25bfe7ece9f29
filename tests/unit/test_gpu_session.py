"""tools/gpu_session.sh, the one command a GPU session runs: the benchmark first, then the 256px model trained
for the time left and evaluated, everything copied to $OUT.

PYTHON points the script at a recording wrapper: it logs every tools/*.py command and replaces the benchmark
with nothing (the benchmark's GPU path runs at small size on the CPU in test_benchmark.py; here only when and
how it is called matters), so the real-mode plan can be checked without a GPU, and the tiny mode's training
and evaluation run for real."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tools import reference_dit as R

PACK_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = PACK_ROOT / "tools" / "gpu_session.sh"


def _run(tmp_path, env: dict, train: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "calls.log"
    shim = tmp_path / "python"
    shim.write_text(f"""#!/usr/bin/env bash
case "$1" in
  tools/benchmark.py) echo "$*" >> {log}; exit 0 ;;
  tools/train_reference.py) echo "$*" >> {log}; {'exec ' + sys.executable + ' "$@"' if train else 'exit 0'} ;;
  *) exec {sys.executable} "$@" ;;
esac
""")
    shim.chmod(0o755)
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHON": str(shim), "OUT": str(out), "OMP_NUM_THREADS": "1", **env})
    return res, (log.read_text().splitlines() if log.exists() else [])


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "docs", "tools/weights"], cwd=PACK_ROOT,
                          capture_output=True, text=True).stdout


def test_real_mode_runs_the_benchmark_first_then_trains_for_the_time_left(tmp_path):
    before = _git_status()
    res, calls = _run(tmp_path, {"GPU_SESSION_SECONDS": "570"}, train=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert calls[0] == "tools/benchmark.py --device cuda --out docs/benchmark.md"
    train = calls[1].split()
    assert train[:4] == ["tools/train_reference.py", "--model", "256px", "--device"] and train[4] == "cuda"
    minutes = float(train[train.index("--minutes") + 1])
    assert 7.5 <= minutes <= 470 / 60, minutes  # 570 s less the 100 s kept for saving and evaluating
    weights = "tools/weights/reference_dit_256.safetensors"
    assert train[-2:] == ["--out", weights]
    if R.MODELS["256px"].is_file():  # shipped weights: the run continues from them, then evaluates them
        assert train[-8:-2] == ["--init-from", weights, "--lr", "4e-4", "--warmup", "50"] and calls[2].startswith(
            "tools/train_reference.py --model 256px --evaluate --device cuda --out " + weights)
    else:  # the wrapper trains nothing, so there is nothing to evaluate
        assert "--init-from" not in train and len(calls) == 2
    assert (tmp_path / "out" / "session.log").read_text().count("== ") >= 2
    assert _git_status() == before

    (tmp_path / "long").mkdir()
    _, calls = _run(tmp_path / "long", {"GPU_SESSION_SECONDS": "2000"}, train=False)
    train = calls[1].split()
    assert train[train.index("--minutes") + 1] == "9.00"  # never more than 9 minutes

    (tmp_path / "short").mkdir()
    res, calls = _run(tmp_path / "short", {"GPU_SESSION_SECONDS": "150"}, train=False)
    assert res.returncode == 0 and len(calls) == 1 and "training skipped: " in res.stdout
    assert "GPU_SESSION_STEPS=train" in res.stdout


def test_tiny_mode_trains_and_evaluates_into_out(tmp_path):
    before = _git_status()
    res, calls = _run(tmp_path, {"GPU_SESSION_TINY": "1"}, train=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert calls[0].startswith("tools/benchmark.py --device cpu --sections time --size small")
    assert calls[1].startswith("tools/train_reference.py --model 256px --device cpu")
    assert calls[2].startswith("tools/train_reference.py --model 256px --evaluate --device cpu")
    out = tmp_path / "out"
    assert {"session.log", "reference_dit_256.safetensors", "evaluation.md", "samples_256.png"} <= set(os.listdir(out))
    evaluation = (out / "evaluation.md").read_text()
    assert "| sigma | trained | random init | zero predictor |" in evaluation and "class probe:" in evaluation
    assert "NOT YET" in evaluation  # three steps of training
    assert R.weights_metadata(out / "reference_dit_256.safetensors")["data"] == "tools/procedural.py sample_scenes"
    assert "gpu_session: finished" in (out / "session.log").read_text()

    # a second run, training only, continues from the weights in $OUT: steps add up, the commands chain
    res, calls = _run(tmp_path, {"GPU_SESSION_TINY": "1", "GPU_SESSION_STEPS": "train"}, train=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert calls[3].startswith("tools/train_reference.py --model 256px --device cpu") and "--init-from" in calls[3]
    meta = R.weights_metadata(out / "reference_dit_256.safetensors")
    assert meta["steps"] == "6" and " && python tools/train_reference.py" in meta["command"]
    assert _git_status() == before

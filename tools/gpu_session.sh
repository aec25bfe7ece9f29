#!/usr/bin/env bash
# One GPU session in one command, under GPU_SESSION_SECONDS (default 570 s, inside a 10-minute command limit):
#   1. benchmark: python tools/benchmark.py --device cuda --out docs/benchmark.md   (first: the wall-time table)
#   2. train:     the 256px reference model for the time left (at most 9 minutes; EVAL_RESERVE seconds are kept
#                 for its start, its save and the evaluation), continuing from its weights file if one exists;
#                 then evaluate it (held-out loss per sigma, class probe, sample grid).
# Everything it writes is also copied to $OUT (default out/gpu_session): session.log (the whole output),
# benchmark.md, reference_dit_256.safetensors, evaluation.md, samples_256.png; tools/weights/README.md says
# where they go in the repository.
#
#   OUT=/somewhere bash tools/gpu_session.sh                    # on a machine with a CUDA GPU
#   GPU_SESSION_STEPS=train OUT=/somewhere bash tools/gpu_session.sh   # the training alone
#   GPU_SESSION_TINY=1 OUT=/tmp/s bash tools/gpu_session.sh      # the same steps at tiny size on the CPU (a test)
#
# Knobs: GPU_SESSION_SECONDS, GPU_SESSION_STEPS (benchmark,train), PYTHON (default python3).
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-out/gpu_session}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_SESSION_SECONDS:-570}"
STEPS=",${GPU_SESSION_STEPS:-benchmark,train},"
TINY="${GPU_SESSION_TINY:-0}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
START=$SECONDS
status=0
echo "gpu_session: $(date -u '+%Y-%m-%d %H:%M UTC'), budget ${BUDGET} s, steps ${STEPS}, tiny ${TINY}," \
     "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

if [ "$TINY" = 1 ]; then  # every step at tiny size on the CPU; nothing in the repository is written
  BENCH=(--device cpu --sections time --size small --repeats 1 --no-host --out "$OUT/benchmark.md")
  BENCH_MD="$OUT/benchmark.md"
  WEIGHTS="$OUT/reference_dit_256.safetensors"
  TINY_CONFIG='{"image_size": 32, "hidden": 32, "heads": 2, "axes_dim": [4, 6, 6],'
  TINY_CONFIG+=' "depth_double": 1, "depth_single": 1}'
  TRAIN=(--device cpu --config "$TINY_CONFIG" --steps 3 --batch 4 --workers 1 --bf16 --compile eager --threads 1)
  EVAL=(--device cpu --probe-steps 3 --samples-per-class 2 --threads 1)
  EVAL_RESERVE=0
else
  BENCH=(--device cuda --out docs/benchmark.md)
  BENCH_MD=docs/benchmark.md
  WEIGHTS=tools/weights/reference_dit_256.safetensors
  TRAIN=(--device cuda --batch 64 --ema 0.998 --dtype bfloat16 --log-every 100 --save-every 500)
  EVAL=(--device cuda)
  EVAL_RESERVE=100  # the trainer's start and save, the evaluation, a margin
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

if [[ "$STEPS" == *,benchmark,* ]]; then
  echo "== 1. benchmark: python tools/benchmark.py ${BENCH[*]}"
  "$PY" tools/benchmark.py "${BENCH[@]}" || { echo "benchmark failed (exit $?)"; status=1; }
  if [ -f "$BENCH_MD" ] && [ "$BENCH_MD" != "$OUT/benchmark.md" ]; then cp "$BENCH_MD" "$OUT/benchmark.md"; fi
  echo "== benchmark done at $((SECONDS - START)) s"
fi

if [[ "$STEPS" == *,train,* ]]; then
  LEFT=$((BUDGET - (SECONDS - START) - EVAL_RESERVE))
  if [ "$TINY" != 1 ]; then
    if [ "$LEFT" -lt 90 ]; then
      echo "== 2. training skipped: ${LEFT} s left in the budget;" \
           "run GPU_SESSION_STEPS=train bash tools/gpu_session.sh next"
      exit $status
    fi
    TRAIN+=(--minutes "$("$PY" -c "print(f'{min(9.0, $LEFT / 60):.2f}')")")
  fi
  if [ -f "$WEIGHTS" ]; then  # continue from them at a lower peak rate: steps add up, the commands chain
    TRAIN+=(--init-from "$WEIGHTS" --lr 4e-4 --warmup 50)
  fi
  TRAIN+=(--out "$WEIGHTS")
  echo "== 2. train at $((SECONDS - START)) s: python tools/train_reference.py --model 256px ${TRAIN[*]}"
  "$PY" tools/train_reference.py --model 256px "${TRAIN[@]}" || { echo "training failed (exit $?)"; status=1; }
  if [ -f "$WEIGHTS" ]; then
    if [ "$WEIGHTS" != "$OUT/reference_dit_256.safetensors" ]; then
      cp "$WEIGHTS" "$OUT/reference_dit_256.safetensors"
    fi
    echo "== 3. evaluate at $((SECONDS - START)) s: python tools/train_reference.py --model 256px --evaluate ${EVAL[*]}"
    "$PY" tools/train_reference.py --model 256px --evaluate "${EVAL[@]}" --out "$WEIGHTS" \
      --grid "$OUT/samples_256.png" | tee "$OUT/evaluation.md" || { echo "evaluation failed (exit $?)"; status=1; }
  fi
fi
echo "gpu_session: finished in $((SECONDS - START)) s (status $status); in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status

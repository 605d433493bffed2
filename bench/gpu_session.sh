#!/usr/bin/env bash
# What the first session with a GPU runs, one stage per call (each fits a 10-minute command), in the
# order of what it unblocks; every result lands under $OUT (default bench-out/).
#
#   bash bench/gpu_session.sh check      # the GPU paths no CPU can run (tests/test_cuda.py); ~1 min
#   bash bench/gpu_session.sh speed-1b   # speed table, Llama-3.2-1B, fixed and variable lengths
#   bash bench/gpu_session.sh speed-8b   # speed table, Llama-3.1-8B, fixed length
#   bash bench/gpu_session.sh plan       # plan's GPU calibration rows (bench/PLAN_CALIBRATION.md)
#   bash bench/gpu_session.sh context [TOKENS]  # Llama-3.1-8B LoRA, one row of TOKENS (default 131072), min_memory
#   bash bench/gpu_session.sh pretrain  # training from random weights (bench/pretrain_gpu.yaml): tokens/s and MFU; ~2 min
#
# Run `check` first: a failing kernel there makes every speed figure after it meaningless.
set -euo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
pip install -q --no-deps -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" \
  >> "$OUT/gpu.txt"

case "${1:-check}" in
  check)
    python -m pytest -q -rs tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt" ;;
  speed-1b)
    python bench/speed.py --shapes llama-3.2-1b --data fixed,variable 2>&1 | tee "$OUT/speed-1b.txt" ;;
  speed-8b)
    python bench/speed.py --shapes llama-3.1-8b --data fixed --loss-steps 20 2>&1 | tee "$OUT/speed-8b.txt" ;;
  plan)
    python bench/plan_calibrate.py --rows gpu --out "$OUT/plan_calibration.md" 2>&1 | tee "$OUT/plan.txt" ;;
  context)  # the longest-context goal: a row that fails is listed as failed, with its error
    python bench/speed.py --shapes llama-3.1-8b --data fixed --stacks tuneforge-min_memory --micro-batch 1 \
      --seq-len "${2:-131072}" --steps 1 --warmup 1 --loss-steps 1 2>&1 | tee "$OUT/context-${2:-131072}.txt" ;;
  pretrain)  # the median of steps after the first 10 (warm-up and the allocator's first steps left out)
    tuneforge train bench/pretrain_gpu.yaml --set output_dir="$OUT/pretrain-gpu" 2>&1 | tee "$OUT/pretrain.txt"
    python - "$OUT/pretrain-gpu/metrics.jsonl" <<'PY' | tee -a "$OUT/pretrain.txt"
import json, statistics, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "tokens_per_s" in r][10:]
print(f"steps {len(rows)}: median tokens/s {statistics.median(r['tokens_per_s'] for r in rows):,.0f}, "
      f"median MFU {statistics.median(r.get('mfu', float('nan')) for r in rows):.1%}")
PY
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh check|speed-1b|speed-8b|plan|context [TOKENS]|pretrain" >&2; exit 2 ;;
esac

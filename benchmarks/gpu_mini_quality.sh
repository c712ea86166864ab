#!/usr/bin/env bash
# One GPU call of the mini models' measurements (docs/mini.md): the quick start as a fresh machine runs
# it (held-out scenes written on first use), timed; then the quality table (benchmarks/mini_quality.py)
# until END_S seconds after the start, JOBS demo processes side by side; a later call with the
# metrics carried back in (output/mini_quality) continues it. Results and logs go to $OUT as two tars.
#   END_S=540 JOBS=15 MPS=1 bash benchmarks/gpu_mini_quality.sh
# SCENES_AT_ONCE=N distills each run's scenes N at a time in one process (demo.py --scenes_at_once), after a
# check on the GPU that two scenes at once give the quick start's metrics for the scene they share.
# MPS=1 runs the quality demos under CUDA MPS, where the machine has it (their tiny kernels then share the
# GPU instead of taking turns); the quick start runs without it, as a user's machine would.
# LPIPS needs the VGG16 weights, which the machine cannot download: carry .carry/vgg (docs/mini.md).
. benchmarks/gpu_setup.sh
export SPARSEFUSION_VGG16=$PWD/.carry/vgg/vgg16_features_fp16.pth
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
mkdir -p output/quick_start
(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 5 > output/gpu_use.csv 2>&1 &)
if [ ! -f output/quick_start/summary.json ]; then
  quick=$(date +%s%N)
  python3 demo.py --mini -o output/quick_start > output/quick_start/demo.log 2>&1
  echo "== quick start: exit $? in $(( ($(date +%s%N) - quick) / 1000000 )) ms"
fi
[ "${MPS:-0}" = 1 ] && start_mps || echo "== MPS off"
batched=()
if [ "${SCENES_AT_ONCE:-1}" -gt 1 ]; then
  python3 demo.py --mini -i 0,1 --scenes_at_once 2 -o output/batched_check > output/batched_check.log 2>&1
  python3 - <<'PY' && batched=("scenes_at_once=$SCENES_AT_ONCE")
import json, sys
alone, batched = (json.load(open(f"output/{d}/metrics/hydrant_000_c2.json"))["novel_views"]
                  for d in ("quick_start", "batched_check"))
print("== hydrant 0 alone / with scene 1 at once:", {k: (alone[k], batched[k]) for k in ("psnr", "ssim", "lpips")})
sys.exit(0 if abs(alone["psnr"] - batched["psnr"]) < 0.5 else 1)
PY
  echo "== quality runs with: ${batched[*]:-one scene at a time}"
fi
# One intra-op thread a process: the demos share the machine's cores.
OMP_NUM_THREADS=1 timeout -s TERM -k 20 $(( END_S - $(elapsed) )) \
  python3 benchmarks/mini_quality.py --out output/mini_quality --jobs "$JOBS" "${batched[@]}" > output/quality_runs.log 2>&1
echo "== quality runs: exit $? at $(elapsed) s"; tail -3 output/quality_runs.log
python3 benchmarks/mini_quality.py --out output/mini_quality --table_only 2>&1 | tail -20
tar cf $OUT/quality.tar output/mini_quality/quality.* output/mini_quality/runs/*/*/metrics output/mini_quality/runs/*/*/demo.log \
  output/quality_runs.log output/batched_check.log output/batched_check/metrics \
  output/gpu_use.csv
tar cf $OUT/quick_start.tar output/quick_start/summary.json output/quick_start/demo.log output/quick_start/metrics \
  output/quick_start/render_gifs output/quick_start/log
echo "== done at $(elapsed) s"

#!/usr/bin/env bash
# One GPU call comparing distillation settings on the mini models' held-out scenes (docs/demo.md, "Speed"):
# row (c) of the quality table (benchmarks/mini_quality.py --methods sparsefusion, no baselines) over 40
# scenes × 3 seeds, 2 input views, for each setting in turn, with timings; results and logs in $OUT/settings.tar.
#   bash benchmarks/gpu_mini_settings.sh                # the settings below
#   SETTINGS="k4:distill.views_per_step=4 distill.iterations=65 distill.fusion_start=25" bash benchmarks/gpu_mini_settings.sh
# Each line of SETTINGS is name:overrides. The demos run 16 at a time under CUDA MPS, 10 scenes at once each.
. benchmarks/gpu_setup.sh
export SPARSEFUSION_VGG16=$PWD/.carry/vgg/vgg16_features_fp16.pth
SETTINGS=${SETTINGS:-"graph:
eager:unet=eager
k2:distill.views_per_step=2 distill.iterations=130 distill.fusion_start=50
k4:distill.views_per_step=4 distill.iterations=65 distill.fusion_start=25
k8:distill.views_per_step=8 distill.iterations=33 distill.fusion_start=13"}
start_mps
mkdir -p output/settings
while IFS= read -r line; do
  name=${line%%:*}; overrides=${line#*:}
  begin=$(date +%s)
  # shellcheck disable=SC2086  # the overrides are words
  OMP_NUM_THREADS=1 python3 benchmarks/mini_quality.py --out output/settings/$name --methods sparsefusion --views 2 \
    --jobs 16 scenes_at_once=10 baselines=false $overrides > output/settings/$name.log 2>&1
  echo "== $name ($overrides): exit $? in $(( $(date +%s) - begin )) s"; grep "(c)" output/settings/$name.log
  # after every setting, so that a call cut short keeps the settings it finished
  tar cf $OUT/settings.tar output/settings/*.log output/settings/*/quality.* output/settings/*/runs/*/*/metrics
done <<< "$SETTINGS"

#!/usr/bin/env bash
# One GPU call of the mini recipe (docs/mini.md): the training and held-out data when missing (traced
# by 15 processes), stage 1 (the VAE) for VAE_BUDGET_S seconds when VAE_STEPS > 0, scored on held-out
# scenes, then stage 2 (EFT + VLDM) until JOINT_STEPS or END_S seconds after the start, resuming the
# checkpoints carried in ($VAE_DIR, $JOINT_DIR: default output/mini/{vae,joint}).
# VAE_ARGS and JOINT_ARGS add train.py overrides (e.g. perceptual_weight=1.0 for the VAE, with
# .carry/vgg carried for its LPIPS; init_eft=checkpoints/mini/eft.pt init_vldm=checkpoints/mini/vldm.pt
# for a first stage 2 on a new VAE). VAE_RUNS trains several VAE recipes side by side instead, one
# "dir overrides..." per line, and exports none of them (pick one on the CPU, as run 2 did).
# The training checkpoints (with optimizer state; the VLDM's in 15 MB parts) go to $OUT, the logs and
# scores in $OUT/results.tar.
# Export them afterwards on the CPU: python -m sparsefusion.export ... (docs/mini.md).
#   VAE_STEPS=100000 VAE_BUDGET_S=240 JOINT_STEPS=100000 END_S=520 bash benchmarks/gpu_mini_train.sh
#   VAE_STEPS=100000 VAE_BUDGET_S=300 VAE_RUNS=$'output/mini/vae_d vae_trains=decoder\noutput/mini/vae_f' \
#     bash benchmarks/gpu_mini_train.sh
# The VAE runs stop at END_S too. Keep END_S some 60 s under the call's limit: stopping, saving and copying take that long there, and
# a stopped train.py can linger at exit (its DataLoader workers), hence timeout's -k.
. benchmarks/gpu_setup.sh
set -o pipefail
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
VAE_DIR=${VAE_DIR:-output/mini/vae}; JOINT_DIR=${JOINT_DIR:-output/mini/joint}
vgg=.carry/vgg/vgg16_features_fp16.pth
[ -f $vgg ] && export SPARSEFUSION_VGG16=$PWD/$vgg  # LPIPS weights the machine cannot download
categories="hydrant teddybear suitcase vase"
if [ ! -f data/mini/train/vase/frame_annotations.jgz ]; then
  python3 -m sparsefusion.data.synthetic --root data/mini/train --categories $categories \
    --scenes 200 --eval-scenes 0 --frames 16 --seed 0 --image-sizes 84x112 112x84 --workers 15 \
    > $OUT/gen.log 2>&1 || { tail -5 $OUT/gen.log; exit 1; }
fi
if [ ! -f data/mini/eval/vase/frame_annotations.jgz ]; then  # as demo.py --mini writes them (configs/mini_demo.yaml)
  python3 -m sparsefusion.data.synthetic --root data/mini/eval --categories $categories \
    --scenes 12 --eval-scenes 12 --frames 32 --seed 1 --image-sizes 84x112 112x84 --workers 15 \
    > $OUT/gen_eval.log 2>&1 || { tail -5 $OUT/gen_eval.log; exit 1; }
fi
echo "== data ready at $(elapsed) s"
train_vae() {  # dir overrides...: one VAE run, scored on the held-out scenes; its checkpoint to $OUT/{name}_vae.pt
  local dir=$1 name=$(basename $1) left=$(( ${END_S:-100000} - $(elapsed) )); shift
  timeout -s TERM -k 30 $(( VAE_BUDGET_S < left ? VAE_BUDGET_S : left )) python3 train.py --config configs/mini_train.yaml stage=vae \
    iterations=$VAE_STEPS exp_dir=$dir "$@" > $OUT/$name.log 2>&1
  echo "== $name rc=$? at $(elapsed) s"; tr '\r' '\n' < $OUT/$name.log | grep -v '^\s*$' | tail -2
  python3 benchmarks/eval_vae.py --vae $dir/ckpt_latest_vae.pt --categories $categories \
    --out $OUT/${name}_heldout | tail -1
  cp $dir/ckpt_latest_vae.pt $OUT/${name}_vae.pt
}
if [ "${VAE_STEPS:-0}" -gt 0 ] && [ -n "${VAE_RUNS:-}" ]; then
  while read -r dir args; do train_vae $dir $args & done <<< "$VAE_RUNS"
  wait
elif [ "${VAE_STEPS:-0}" -gt 0 ]; then
  train_vae $VAE_DIR $VAE_ARGS
  python3 -m sparsefusion.export --vae $VAE_DIR/ckpt_latest_vae.pt --out checkpoints/mini | tail -1 || exit 1
fi
if [ "${JOINT_STEPS:-0}" -gt 0 ]; then
  budget=$(( END_S - $(elapsed) ))
  echo "== joint: $budget s"
  timeout -s TERM -k 30 "$budget" python3 train.py --config configs/mini_train.yaml stage=joint \
    iterations=$JOINT_STEPS exp_dir=$JOINT_DIR $JOINT_ARGS > $OUT/joint.log 2>&1
  echo "== joint rc=$? at $(elapsed) s"; tr '\r' '\n' < $OUT/joint.log | grep -v '^\s*$' | tail -3
  split -b 15M $JOINT_DIR/ckpt_latest.pt $OUT/ckpt_latest.pt.part.
  cp $JOINT_DIR/ckpt_latest_eft.pt $OUT/
fi
vae_dirs=$(echo "${VAE_RUNS:-$VAE_DIR}" | while read -r dir _; do echo $dir/log $dir/config.yaml; done)
tar cf $OUT/logs.tar $vae_dirs $JOINT_DIR/log $JOINT_DIR/config.yaml 2>/dev/null
# A call brings back at most 8 files: everything but the checkpoints goes into one tar.
(cd $OUT && tar cf results.tar --remove-files $(ls | grep -v -e '\.pt$' -e '\.part\.'))
echo "== done at $(elapsed) s"; ls -la $OUT

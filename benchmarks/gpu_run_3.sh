#!/usr/bin/env bash
# Third GPU call: a full-size demo scene on the compile path, the CUDA training test, a short train.py run.
. benchmarks/gpu_setup.sh
set -o pipefail
python3 -c "import torch, torchvision; torch.save(torchvision.models.vgg16().state_dict(), '/tmp/vgg16.pth')"
export SPARSEFUSION_VGG16=/tmp/vgg16.pth
timeout 330 python3 benchmarks/bench_demo.py --iterations 1500 --unet compile --extra "--fusion_start 500" --out $OUT/bench_demo_compile.json > $OUT/bench_demo_compile.log 2>&1; echo "== demo rc=$?"; tail -14 $OUT/bench_demo_compile.log
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_training.py -k cuda 2>&1 | tail -2
python3 -m sparsefusion.data.synthetic --root /tmp/syn --categories hydrant --scenes 4 --frames 24 > /dev/null
timeout 150 python3 train.py -c hydrant -d synthetic -r /tmp/syn vae=random iterations=100 save_itr=50 vis_itr=50 log_itr=10 num_workers=2 precision=bf16 exp_dir=/tmp/train > $OUT/train.log 2>&1; echo "== train rc=$?"; tail -5 $OUT/train.log; ls -la /tmp/train /tmp/train/log | head -20; cp /tmp/train/log/*.jpg $OUT/ 2>/dev/null

#!/usr/bin/env bash
# Second GPU call: the CUDA tests that failed before, the EFT cache benchmark, one full-size demo scene.
. benchmarks/gpu_setup.sh
set -o pipefail
python3 -c "import torch, torchvision; torch.save(torchvision.models.vgg16().state_dict(), '/tmp/vgg16.pth')"
export SPARSEFUSION_VGG16=/tmp/vgg16.pth
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gridencoder.py tests/test_eft.py tests/test_vldm.py tests/test_vae.py tests/test_nerf.py 2>&1 | tee $OUT/pytest.log | tail -4
timeout 120 python3 benchmarks/bench_eft.py --device cuda --out $OUT/bench_eft.json > $OUT/bench_eft.log 2>&1; echo "== bench_eft rc=$?"; tail -16 $OUT/bench_eft.log
timeout 300 python3 benchmarks/bench_demo.py --iterations 600 --unet graph --extra "--fusion_start 200" --out $OUT/bench_demo.json > $OUT/bench_demo.log 2>&1; echo "== bench_demo rc=$?"; tail -30 $OUT/bench_demo.log

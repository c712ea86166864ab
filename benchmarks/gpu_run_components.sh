#!/usr/bin/env bash
# One GPU call: the test suite on this machine's PyTorch, then every component benchmark; logs to $OUT.
. benchmarks/gpu_setup.sh
set -o pipefail
python3 -c "import torch, torchvision; torch.save(torchvision.models.vgg16().state_dict(), '/tmp/vgg16.pth')"
export SPARSEFUSION_VGG16=/tmp/vgg16.pth   # random VGG16: timings only, no metric values
timeout 200 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee $OUT/pytest.log | tail -4
for b in eft vae nerf metrics; do
  timeout 120 python3 benchmarks/bench_$b.py --device cuda --out $OUT/bench_$b.json > $OUT/bench_$b.log 2>&1
  echo "== bench_$b rc=$?"; tail -14 $OUT/bench_$b.log
done

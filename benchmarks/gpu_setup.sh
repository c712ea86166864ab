#!/usr/bin/env bash
# Source on a bare GPU machine without a package index: installs the wheels carried in .whl/ for the
# modules that are not importable there, into /tmp/site, and puts the repository on PYTHONPATH.
#   . benchmarks/gpu_setup.sh
# start_mps then starts CUDA MPS where the machine has it, so that processes' tiny kernels share the GPU.
site=/tmp/site
mkdir -p "$site"
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
missing=()
for pair in einops:einops lpips:lpips omegaconf:omegaconf antlr4:antlr4_python3_runtime skimage:scikit_image \
            lazy_loader:lazy_loader tifffile:tifffile imageio:imageio tqdm:tqdm mcubes:PyMCubes; do
  module=${pair%%:*}; wheel=${pair##*:}
  python3 -c "import $module" 2>/dev/null || missing+=(.whl/${wheel}-*.whl)
done
if [ ${#missing[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${missing[@]}"
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

start_mps() {
  command -v nvidia-cuda-mps-control > /dev/null || { echo "== no MPS here"; return 1; }
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  if nvidia-cuda-mps-control -d && timeout 60 python3 -c "import torch; torch.ones(1, device='cuda')"; then
    echo "== MPS on"
  else
    echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; echo "== MPS failed, off"
    return 1
  fi
}

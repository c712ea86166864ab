#!/usr/bin/env bash
# The tests that need CUDA (they skip on the CPU), on a GPU machine: every test of tests/test_fast_paths_cuda.py
# and the CUDA tests of the other files. Log in ${OUT:-.}/gpu_tests.log.
#   bash benchmarks/gpu_tests.sh
. benchmarks/gpu_setup.sh
export SPARSEFUSION_VGG16=$PWD/.carry/vgg/vgg16_features_fp16.pth
python3 -m pytest -q -rs -p no:cacheprovider tests/test_fast_paths_cuda.py \
  tests/test_data.py::test_tracing_on_the_gpu_matches_the_cpu \
  tests/test_eft.py::test_cuda_rendering_matches_cpu_fp32 \
  tests/test_gridencoder.py::test_triton_kernel_matches_reference_on_cuda \
  tests/test_gridencoder.py::test_stacked_scenes_encode_as_each_scene_alone_with_the_triton_kernel_on_cuda \
  tests/test_training.py::test_cuda_bf16_steps_match_fp32_and_resume \
  tests/test_vldm.py::test_cuda_graph_replay_matches_eager_on_new_inputs \
  tests/test_vldm.py::test_fast_cuda_path_stays_close_to_fp32 \
  tests/test_vae.py::test_bf16_autocast_stays_close_to_fp32 \
  tests/test_nerf.py::test_autocast_rendering_stays_finite_and_close "$@" 2>&1 | tee "${OUT:-.}/gpu_tests.log"

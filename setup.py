"""pip install -e . — SparseFusion, reimplemented for a current PyTorch."""
from setuptools import find_packages, setup

setup(
    name="sparsefusion",
    version="0.1.0",
    description="SparseFusion (CVPR 2023): distilling view-conditioned diffusion for 3D reconstruction",
    python_requires=">=3.9",
    # the repository's external/ folder installs as sparsefusion.external: no generic top-level name
    packages=sorted(set(find_packages(include=["sparsefusion", "sparsefusion.*"])
                        + [f"sparsefusion.{name}" for name in find_packages(include=["external", "external.*"])])),
    package_dir={"sparsefusion.external": "external"},
    install_requires=[
        "torch>=2.10",           # the models, autograd, torch.distributed; safe weights_only loading (ENVIRONMENT.md)
        "torchvision>=0.16",     # ResNet-18 backbone of the EFT, VGG16 of LPIPS
        "numpy",
        "einops",                # tensor rearrangements in the UNet and EFT
        "imageio",               # PNG/JPEG/GIF outputs and dataset images
        "pillow",                # reading CO3D images and masks exactly as implicitron does (PIL convert)
        "tqdm",                  # progress bars
        "lpips",                 # LPIPS linear layers (the backbone is loaded offline by us)
        "omegaconf",             # train.py YAML configuration with overrides
        "scikit-image",          # PSNR/SSIM as upstream computes them, marching cubes
        "safetensors",           # diffusers-format VAE weights
        "matplotlib",            # loss plots
        "tensorboard",           # training scalars
    ],
    extras_require={
        "test": ["pytest>=7", "ruff"],  # ruff: the linter .ci/run applies (ruff.toml)
        "pytorch3d": ["pytorch3d"],      # optional: cross-checks of our camera conventions
        "tcnn": ["tinycudann"],          # optional: tiny-cuda-nn grid-encoder backend
    },
)

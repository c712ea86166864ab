"""SparseFusion: distilling view-conditioned diffusion for 3D reconstruction (Zhou & Tulsiani, CVPR 2023)."""

__version__ = "0.1.0"

"""Other tools' camera conventions, converted exactly into ours (PyTorch3D's, sparsefusion/cameras.py).

  * OpenCV / COLMAP: world-to-camera x_cam = R_cv x_world + t (column vectors); camera +X right,
    +Y down, +Z forward; COLMAP stores R_cv as a unit quaternion (qw, qx, qy, qz).
  * OpenGL / nerfstudio / instant-ngp: camera-to-world c2w (4, 4), x_world = c2w[:3, :3] x_cam +
    c2w[:3, 3]; camera +X right, +Y up, +Z backward (it looks down −Z).
  * Pixel intrinsics (all three tools): fx, fy, cx, cy in pixels of an image spanning [0, W] × [0, H],
    the upper-left pixel's centre at (0.5, 0.5) — the continuous pixel coordinates of crop.py.
  * Ours: row vectors X_view = X_world · R + T; +X left, +Y up, +Z forward; NDC intrinsics.

OpenCV → ours flips the camera's X and Y: X_view = F x_cam with F = diag(−1, −1, 1), so
R = R_cvᵀ F and T = F t. OpenGL → OpenCV flips Y and Z: R_cv = G c2w[:3, :3]ᵀ with G = diag(1, −1, −1),
t = −R_cv c2w[:3, 3].
"""

import torch

from sparsefusion.cameras import PerspectiveCameras
from sparsefusion.data.crop import pixel_to_ndc_intrinsics

OPENCV_TO_OURS = (-1.0, -1.0, 1.0)   # F: camera axis signs from OpenCV's to ours
OPENGL_TO_OPENCV = (1.0, -1.0, -1.0)  # G: camera axis signs from OpenGL's to OpenCV's


def rotation_from_quaternion(qvec):
    """Return rotation matrices (..., 3, 3) of quaternions (..., 4) (qw, qx, qy, qz), normalised first (COLMAP's)."""
    w, x, y, z = torch.unbind(qvec / qvec.norm(dim=-1, keepdim=True), dim=-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(*qvec.shape[:-1], 3, 3)


def opencv_from_opengl(c2w):
    """Return (R_cv (..., 3, 3), t (..., 3)), the OpenCV world-to-camera pose of OpenGL camera-to-world (..., 4|3, 4)."""
    flip = c2w.new_tensor(OPENGL_TO_OPENCV)
    R_cv = flip[:, None] * c2w[..., :3, :3].transpose(-1, -2)
    t = -(R_cv @ c2w[..., :3, 3:4])[..., 0]
    return R_cv, t


def opencv_from_ours(R, T):
    """Return (R_cv (..., 3, 3), t (..., 3)), the OpenCV world-to-camera pose of our R (..., 3, 3), T (..., 3)."""
    flip = R.new_tensor(OPENCV_TO_OURS)
    return flip[:, None] * R.transpose(-1, -2), T * flip


def cameras_from_opencv(R_cv, t, focal_px, principal_px, image_hw):
    """Return our PerspectiveCameras (N) of OpenCV poses and pixel intrinsics (as PyTorch3D's cameras_from_opencv_projection).

    Args:
        R_cv: (N, 3, 3) world-to-camera rotations; t: (N, 3) translations (column-vector convention).
        focal_px, principal_px: (N, 2) (fx, fy) and (cx, cy) in pixels.
        image_hw: (N, 2) (height, width) in pixels.
    """
    flip = R_cv.new_tensor(OPENCV_TO_OURS)
    R = R_cv.transpose(-1, -2) * flip
    T = t * flip
    focal_length, principal_point = pixel_to_ndc_intrinsics(focal_px, principal_px, image_hw.to(R_cv.dtype))
    return PerspectiveCameras(R=R, T=T, focal_length=focal_length, principal_point=principal_point,
                              image_size=image_hw.to(R_cv.dtype))


def rotation_error(matrix):
    """Return max |M Mᵀ − I| + |det M − 1| (...,) of (..., 3, 3) matrices: 0 for a rotation."""
    eye = torch.eye(3, dtype=matrix.dtype, device=matrix.device)
    orthogonality = (matrix @ matrix.transpose(-1, -2) - eye).abs().amax(dim=(-1, -2))
    return orthogonality + (torch.linalg.det(matrix) - 1).abs()

"""Mesh export of a fitted field by marching cubes (Lorensen & Cline 1987), with vertex colours.

Beyond upstream (its export_mesh is disabled in the release): the density is sampled on a regular
grid over the scene box, the iso-surface at a density threshold is extracted with scikit-image's
marching cubes, and each vertex is coloured by the field's albedo there. Writes .ply (binary, uchar
colours) or .obj (`v x y z r g b`, colours in [0, 1], read by MeshLab and Blender).

    python -m sparsefusion.mesh output/demo/scene.pt scene.ply --threshold 10 --resolution 256
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from skimage.measure import marching_cubes

from sparsefusion.atomic_files import write_bytes
from sparsefusion.errors import UserError, exit_on_user_error

MESH_FORMATS = (".ply", ".obj")


class NoSurface(UserError):
    """The density threshold lies outside the field's densities; callers name their own threshold flag."""


def field_device(field):
    """Return the device of a field's parameters (CPU for a field without any)."""
    parameters = list(field.parameters()) if isinstance(field, torch.nn.Module) else []
    return parameters[0].device if parameters else torch.device("cpu")


@torch.no_grad()
def density_grid(field, bound, resolution, chunk=65536):
    """Return densities (N, N, N) float32 numpy at the grid points linspace(−bound, bound, N)^3, indexed [x, y, z].

    field maps points (P, 3) to (density (P,), albedo (P, 3)); it is queried chunk points at a time.
    """
    device = field_device(field)
    axis = torch.linspace(-bound, bound, resolution, device=device)
    densities = []
    for start in range(0, resolution**3, chunk):
        flat = torch.arange(start, min(start + chunk, resolution**3), device=device)
        index = torch.stack([flat // resolution**2, flat // resolution % resolution, flat % resolution], dim=-1)
        densities.append(field(axis[index])[0].float())
    return torch.cat(densities).reshape(resolution, resolution, resolution).cpu().numpy()


@torch.no_grad()
def extract_mesh(field, bound, resolution=256, threshold=10.0, chunk=65536):
    """Return (vertices (V, 3) float32 world coordinates, faces (F, 3) int64, colours (V, 3) uint8).

    The surface is where the density crosses threshold (torch-ngp's density_thresh, 10, by default);
    faces are wound so their normals point out of the dense region.
    """
    densities = density_grid(field, bound, resolution, chunk)
    low, high = float(densities.min()), float(densities.max())
    if not low < threshold < high:
        raise NoSurface(f"no surface at density threshold {threshold}: the field's densities range from {low:.4g} "
                        f"to {high:.4g}; pass a threshold between them")
    spacing = 2 * bound / (resolution - 1)
    vertices, faces, _, _ = marching_cubes(densities, level=threshold, spacing=(spacing,) * 3,
                                           gradient_direction="ascent")
    vertices = (vertices - bound).astype(np.float32)
    points = torch.from_numpy(vertices).to(field_device(field))
    albedo = torch.cat([field(points[i:i + chunk])[1].float() for i in range(0, len(points), chunk)])
    colors = (albedo.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return vertices, faces.astype(np.int64), colors


def ply_bytes(vertices, faces, colors):
    """Return a binary little-endian PLY file with per-vertex uchar colours."""
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertices)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {len(faces)}\n"
        "property list uchar int vertex_indices\nend_header\n"
    )
    vertex_type = np.dtype([("xyz", "<f4", 3), ("rgb", "u1", 3)])
    vertex_rows = np.empty(len(vertices), dtype=vertex_type)
    vertex_rows["xyz"], vertex_rows["rgb"] = vertices, colors
    face_type = np.dtype([("n", "u1"), ("ids", "<i4", 3)])
    face_rows = np.empty(len(faces), dtype=face_type)
    face_rows["n"], face_rows["ids"] = 3, faces
    return header.encode("ascii") + vertex_rows.tobytes() + face_rows.tobytes()


def obj_bytes(vertices, faces, colors):
    """Return an OBJ file with `v x y z r g b` vertex colours in [0, 1] and 1-based triangle faces."""
    lines = [
        f"v {x:.6f} {y:.6f} {z:.6f} {r / 255:.4f} {g / 255:.4f} {b / 255:.4f}"
        for (x, y, z), (r, g, b) in zip(vertices.tolist(), colors.tolist())
    ]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces.tolist()]
    return ("\n".join(lines) + "\n").encode("ascii")


def checked_mesh_path(path):
    """Return path as a Path if it names a mesh format we write, else raise UserError."""
    path = Path(path)
    if path.suffix.lower() not in MESH_FORMATS:
        raise UserError(f"mesh file {path} must end in {' or '.join(MESH_FORMATS)}")
    return path


def write_mesh(path, vertices, faces, colors):
    """Write a coloured triangle mesh to path (.ply or .obj, chosen by suffix) atomically; return the path."""
    path = checked_mesh_path(path)
    encode = ply_bytes if path.suffix.lower() == ".ply" else obj_bytes
    return write_bytes(encode(vertices, faces, colors), path)


def export_mesh(field, path, bound, resolution=256, threshold=10.0):
    """Extract the field's surface at a density threshold and write it with vertex colours; return the path."""
    return write_mesh(path, *extract_mesh(field, bound, resolution, threshold))


def main(argv=None):
    """Command line: export the mesh of a saved NeRF checkpoint ({'model_state_dict': ...})."""
    from sparsefusion.external.nerf_network import NeRFConfig, NeRFNetwork
    from sparsefusion.checkpoint import load_file, load_state_dict_strict

    parser = argparse.ArgumentParser(description="Export a coloured mesh of a fitted NeRF by marching cubes.")
    parser.add_argument("checkpoint", help="NeRF checkpoint saved by the distillation ({'model_state_dict': ...})")
    parser.add_argument("output", help="mesh file to write, .ply or .obj")
    parser.add_argument("--threshold", type=float, default=10.0, help="density of the surface (default 10)")
    parser.add_argument("--resolution", type=int, default=256, help="grid points per axis (default 256)")
    parser.add_argument("--bound", type=float, default=4.0, help="half-size of the scene box (default 4, upstream's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        checked_mesh_path(args.output)  # before the slow part
        network = NeRFNetwork(NeRFConfig(bound=args.bound))
        checkpoint = load_file(args.checkpoint, "NeRF checkpoint")
        state = checkpoint.get("model_state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
        load_state_dict_strict(network, state, f"NeRF checkpoint {args.checkpoint}")
        network = network.to(args.device).eval()
        try:
            path = export_mesh(network, args.output, args.bound, args.resolution, args.threshold)
        except NoSurface as err:
            raise UserError(f"{err} with --threshold") from err
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

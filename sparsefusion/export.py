"""Inference copies of trained checkpoints: half-precision weights and the architecture, no optimizer state.

    python -m sparsefusion.export --vae output/mini/vae/ckpt_latest_vae.pt --out checkpoints/mini   # after stage 1
    python -m sparsefusion.export --joint output/mini/joint --out checkpoints/mini                  # after stage 2

writes vae.pt ({'step', 'state_dict', 'config', 'scale_factor'}, which load_vae reads) and eft.pt and
vldm.pt ({'step', 'model_state_dict', 'config'}, upstream's layout, which load_eft and
VLDM.from_checkpoint read) plus the 'checksum' every checkpoint of ours carries, floating-point
tensors stored as float16 (loaded back as float32), and
updates manifest.json: each file's source, training step, number of stored floating-point values (weights and buffers), size and SHA-256.
The joint stage trains on the exported vae.pt, so the VAE that ships is the one its models saw.
"""

import argparse
import hashlib
import json
from pathlib import Path


from sparsefusion.checkpoint import load_file, save_atomic
from sparsefusion.errors import UserError, exit_on_user_error
from sparsefusion.outputs import write_json


def half_precision(state_dict):
    """Return state_dict with floating-point tensors as float16 (integer buffers unchanged), contiguous copies."""
    return {key: (value.half() if value.is_floating_point() else value).contiguous().clone()
            for key, value in state_dict.items()}


def inference_copy(checkpoint, weights_key):
    """Return the entries of a training checkpoint that inference reads, weights in float16."""
    if weights_key not in checkpoint or "config" not in checkpoint:
        raise UserError(f"a training checkpoint needs '{weights_key}' and 'config', found {sorted(checkpoint)}")
    kept = {"step": checkpoint.get("step", 0), weights_key: half_precision(checkpoint[weights_key]),
            "config": checkpoint["config"]}
    if "scale_factor" in checkpoint:
        kept["scale_factor"] = checkpoint["scale_factor"]
    return kept


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export(out_dir, joint_dir=None, vae_path=None):
    """Write vae.pt (from vae_path) and/or eft.pt and vldm.pt (from joint_dir) into out_dir; return the manifest."""
    out_dir = Path(out_dir)
    sources = {}
    if vae_path:
        sources["vae"] = (Path(vae_path), "state_dict")
    if joint_dir:
        sources["eft"] = (Path(joint_dir) / "ckpt_latest_eft.pt", "model_state_dict")
        sources["vldm"] = (Path(joint_dir) / "ckpt_latest.pt", "model_state_dict")
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for name, (source, weights_key) in sources.items():
        copy = inference_copy(load_file(source, f"{name.upper()} training checkpoint"), weights_key)
        path = save_atomic(copy, out_dir / f"{name}.pt")
        manifest[name] = {"file": path.name, "source": str(source), "step": int(copy["step"]),
                          "float_values": sum(v.numel() for v in copy[weights_key].values() if v.is_floating_point()),
                          "bytes": path.stat().st_size, "sha256": sha256(path)}
    write_json(manifest, manifest_path)
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--joint", help="exp_dir of a stage=joint run (ckpt_latest{,_eft}.pt)")
    parser.add_argument("--vae", help="a stage=vae run's ckpt_latest_vae.pt")
    parser.add_argument("--out", required=True, help="folder for eft.pt, vldm.pt, vae.pt and manifest.json")
    args = parser.parse_args(argv)
    if not (args.joint or args.vae):
        parser.error("pass --joint, --vae or both")
    with exit_on_user_error():
        manifest = export(args.out, args.joint, args.vae)
    print(json.dumps(manifest, indent=2))
    total = sum(entry["bytes"] for entry in manifest.values())
    print(f"{total / 2 ** 20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()

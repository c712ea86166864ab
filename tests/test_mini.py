"""The shipped mini models: they load as they are, and the method beats its ablation on a held-out scene."""

import hashlib
import json
from pathlib import Path

import pytest

import demo
from sparsefusion.demo_config import load_demo_config
from sparsefusion.models import load_models

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "checkpoints" / "mini"


def test_shipped_checkpoints_match_their_manifest_and_load_together():
    manifest = json.loads((MINI / "manifest.json").read_text())
    assert set(manifest) == {"eft", "vldm", "vae"}
    for entry in manifest.values():
        assert hashlib.sha256((MINI / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    assert sum((MINI / entry["file"]).stat().st_size for entry in manifest.values()) < 25 * 2 ** 20
    config = load_demo_config(demo.MINI_CONFIG, [f"eft={MINI / 'eft.pt'}", f"vldm={MINI / 'vldm.pt'}",
                                                 f"vae={MINI / 'vae.pt'}"])
    models = load_models("hydrant", config, "cpu")  # strict keys, architectures from the files, widths checked
    assert (models.image_size, models.latent_stride) == (64, 4)
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in models.vldm.parameters())


@pytest.fixture(scope="module")
def held_out_runs(tmp_path_factory):
    """The quick start at reduced sizes on a held-out scene, by the method and by its ablation; their records."""
    work = tmp_path_factory.mktemp("mini")
    reduced = [f"root={work / 'data'}", "generate.scenes=1", "generate.frames=16", "generate.workers=1",
               f"eft={MINI / 'eft.pt'}", f"vldm={MINI / 'vldm.pt'}", f"vae={MINI / 'vae.pt'}",
               "distill.iterations=100", "distill.fusion_start=50", "distill.perceptual_start=50",
               "distill.lr_step=100", "distill.circle_cameras=8", "distill.turntable_frames=2", "mesh_resolution=32"]
    records = {}
    for method in ("sparsefusion", "inputs_only"):
        out = work / method
        demo.main(["--mini", *reduced, f"output={out}", f"distill.method={method}"])
        records[method] = json.loads((out / "metrics" / "hydrant_000_c2.json").read_text())
    return records


def test_the_method_beats_the_input_views_only_nerf_on_novel_views(held_out_runs):
    ours, ablation = held_out_runs["sparsefusion"]["novel_views"], held_out_runs["inputs_only"]["novel_views"]
    assert ours["psnr"] > ablation["psnr"] + 2.0, (ours, ablation)
    assert ours["ssim"] > ablation["ssim"] + 0.1, (ours, ablation)
    assert ours["lpips"] < ablation["lpips"] - 0.05, (ours, ablation)

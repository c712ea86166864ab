"""demo.py end to end on a small synthetic scene with small models saved by our own modules."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import demo
from sparsefusion.external.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from sparsefusion.external.imagen_unet import UnetConfig
from sparsefusion.data.synthetic import main as generate_synthetic
from sparsefusion.eft import EFTConfig, EpipolarFeatureTransformer, save_eft
from sparsefusion.errors import UserError
from sparsefusion.metrics import psnr, ssim
from sparsefusion.vae import save_vae
from sparsefusion.vldm import VLDM, VLDMConfig, save_vldm

REPO = Path(__file__).resolve().parents[1]
SIZE, TURNTABLE = 32, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A one-scene synthetic dataset and tiny EFT / VLDM / VAE checkpoints; returns their paths."""
    root = tmp_path_factory.mktemp("demo")
    generate_synthetic(["--root", str(root / "data"), "--categories", "hydrant", "--scenes", "2", "--eval-scenes", "2", "--frames", "12",
                        "--image-sizes", "48x64"])
    torch.manual_seed(0)
    eft = EpipolarFeatureTransformer(EFTConfig(hidden_dim=16, n_layers=1, backbone_weights="random"))
    save_eft(eft, root / "eft.pt")
    vldm = VLDM(VLDMConfig(unet=UnetConfig.small(cond_images_channels=16), image_size=SIZE // 8))
    save_vldm(vldm, root / "vldm.pt")
    vae = AutoencoderKL(AutoencoderKLConfig(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=4))
    save_vae(vae, root / "vae.ckpt")
    return root


def flags(root, *extra):
    """demo.py flags for the small setup; later flags override earlier ones (argparse keeps the last)."""
    return ["-d", "synthetic", "-r", str(root / "data"), "-c", "hydrant",
            "-e", str(root / "eft.pt"), "-l", str(root / "vldm.pt"), "-a", str(root / "vae.ckpt"),
            "-o", str(root / "out"), *extra]


SMALL_RUN = ["--image_size", str(SIZE), "--iterations", "14", "--fusion_start", "6", "--train_rays", "16",
             "--circle_cameras", "3", "--turntable_frames", str(TURNTABLE), "--num_steps", "8",
             "--upsample_steps", "8", "--mesh_resolution", "32", "--mesh_threshold", "1"]


@pytest.fixture(scope="module")
def run(setup):
    """Run demo.py once; return (output folder, the scene's metrics record)."""
    demo.main(flags(setup, *SMALL_RUN))
    out = setup / "out"
    return out, json.loads((out / "metrics" / "hydrant_000_c2.json").read_text())


def test_every_output_is_written(run):
    out, record = run
    label = "hydrant_000_c2"
    expected = [f"log/{label}_inputs.jpg", f"log/{label}_eft_grid.jpg", f"log/{label}_loss.jpg",
                f"log/{label}_fusionloss.jpg", f"log/{label}_vis.jpg", f"render_gifs/{label}.gif",
                f"render_gifs/{label}_circle.gif", f"metrics/{label}.txt", f"metrics/{label}.json",
                f"meshes/{label}.ply", f"{label}.pt", "summary.json", "index.html"]
    for name in expected:
        assert (out / name).is_file(), name
    n_views = record["n_views"]
    assert sorted(p.name for p in (out / "render_imgs" / label).iterdir()) == [f"{i:03d}.jpg" for i in range(n_views)]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))  # no half-written files
    assert record["input_views"] == torch.randperm(n_views, generator=torch.Generator().manual_seed(0))[:2].tolist()
    assert set(record["timings"]) == {"feature_cache_s", "bootstrap_s", "diffusion_s", "evaluation_s"}
    summary = json.loads((out / "summary.json").read_text())
    assert [s["sequence"] for s in summary["scenes"]] == [label]
    nerf = torch.load(out / f"{label}.pt", weights_only=True)["model_state_dict"]
    assert "encoder.embeddings" in nerf
    page = (out / "index.html").read_text()  # the run page, final: no reloading
    assert "run finished" in page and f'src="render_gifs/{label}.gif"' in page
    strip = imageio.imread(out / "log" / f"{label}_inputs.jpg")
    assert strip.shape[:2] == (SIZE, 2 * SIZE)  # the two input views side by side


def test_gifs_have_the_frame_counts_and_panels(run):
    out, record = run
    frames = imageio.mimread(out / "render_gifs" / "hydrant_000_c2.gif")
    assert len(frames) == record["n_views"]
    assert frames[0].shape[:2] == (SIZE, 5 * SIZE)  # ground truth | EFT | ours | ground-truth mask | our mask
    turntable = imageio.mimread(out / "render_gifs" / "hydrant_000_c2_circle.gif")
    assert len(turntable) == TURNTABLE and turntable[0].shape[:2] == (SIZE, 2 * SIZE)
    grid = imageio.imread(out / "log" / "hydrant_000_c2_eft_grid.jpg")
    rows = -(-record["n_views"] // 8)
    assert grid.shape[:2] == (rows * SIZE, 8 * SIZE)


def test_metrics_agree_with_the_saved_frames(run):
    out, record = run
    frames = sorted((out / "render_imgs" / "hydrant_000_c2").iterdir())
    pairs = [imageio.imread(path).astype(np.float32) / 255 for path in frames]
    ours_psnr = [psnr(p[:, SIZE:], p[:, :SIZE]) for p in pairs]
    ours_ssim = [ssim(p[:, SIZE:], p[:, :SIZE]) for p in pairs]
    # the frames are JPEGs (as upstream writes them): agreement up to compression
    assert abs(np.mean(ours_psnr) - record["psnr"]) < 0.5
    assert abs(np.mean(ours_ssim) - record["ssim"]) < 0.05
    assert np.allclose([f["psnr"] for f in record["frames"]], ours_psnr, atol=1.0)
    text = (out / "metrics" / "hydrant_000_c2.txt").read_text()
    assert f"psnr:\n{record['psnr']}" in text


@pytest.mark.parametrize("extra, message", [
    (["-i", "0,x"], "-i/--idx '0,x' is invalid"),
    (["-i", "4"], "-i/--idx 4 is out of range: hydrant has 2 scenes"),
    (["-v", "99"], "-v/--input_views 99 is more than the"),
    (["distill.views_per_step=99"], "distill.views_per_step 99 is more than the 82 cached cameras of hydrant scene 0 "
                                    "(32 views + distill.circle_cameras); e.g. distill.views_per_step=82"),
    (["-c", "hydrantt", "-d", "co3d"], "unknown category 'hydrantt'"),
    (["--scenes_at_once", "0"], "--scenes_at_once must be at least 1, got 0; e.g. --scenes_at_once 1"),
    (["--scenes_at_once", "2", "distill.nerf.grid_backend=tcnn"], "the tcnn backend cannot make; use "
                                                                  "distill.nerf.grid_backend=auto"),
    (["-e", "missing/eft.pt"], "EFT checkpoint not found at missing/eft.pt; get it from the SparseFusion weights"),
    (["-r", "nowhere"], "no synthetic data for ['hydrant'] under nowhere; generate it first"),
])
def test_bad_input_fails_with_one_line(setup, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(flags(setup, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_more_gpus_than_present_is_refused(setup, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit):
        demo.main(flags(setup, "-g", "2"))
    assert "asks for more GPUs than the 1 present" in capsys.readouterr().err


def test_command_line_error_has_no_traceback(setup):
    done = subprocess.run([sys.executable, "demo.py", *flags(setup, "-i", "7")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: -i/--idx 7 is out of range")


def test_two_processes_split_the_scenes_and_rank_0_summarises(setup, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks: one thread each on a small machine
    out = setup / "out_g2"
    demo.main(flags(setup, "-g", "2", "-i", "0,1", "-o", str(out), *SMALL_RUN, "--iterations", "4", "--fusion_start", "2"))
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(s["sequence"] for s in summary["scenes"]) == ["hydrant_000_c2", "hydrant_001_c2"]
    assert (out / "render_gifs" / "hydrant_001_c2.gif").is_file() and (out / "hydrant_000_c2.pt").is_file()
    page = (out / "index.html").read_text()  # rank 0's last page shows rank 1's scene too
    assert 'href="#scene-hydrant_000_c2"' in page and 'href="#scene-hydrant_001_c2"' in page


def test_scenes_at_once_write_each_scenes_outputs_as_one_at_a_time(setup):
    """Two scenes distilled at once: the same files, metrics, baselines and NeRF per scene as one at a time, up to
    the rounding of batched kernels. Adam turns that rounding into whole steps where a gradient is itself at the
    rounding level (|g| near Adam's ε = 1e-8, e.g. grid rows that rays barely touch): such entries move by up to
    the grid's learning rate (5e-3) in one run and not the other. A few hundred of the 1.9 M grid entries do; the
    rest agree to 1e-4 and the metrics to 1e-3."""
    runs = {}
    for at_once in (1, 2):
        out = setup / f"out_at_once_{at_once}"
        demo.main(flags(setup, *SMALL_RUN, "-i", "0,1", "--iterations", "10", "--fusion_start", "4", "baselines=true",
                        "-o", str(out), "--scenes_at_once", str(at_once)))
        runs[at_once] = out
    for label in ("hydrant_000_c2", "hydrant_001_c2"):
        one, two = (json.loads((runs[n] / "metrics" / f"{label}.json").read_text()) for n in (1, 2))
        assert two["scenes_at_once"] == 2 and "scenes_at_once" not in one
        assert two["input_views"] == one["input_views"] and set(two["timings"]) == set(one["timings"])
        for key in ("psnr", "ssim", "lpips"):
            assert two[key] == pytest.approx(one[key], rel=1e-3), key
        assert [f["psnr"] for f in two["frames"]] == pytest.approx([f["psnr"] for f in one["frames"]], rel=1e-3)
        for name in ("eft", "vldm", "nearest_input"):
            assert two["baselines"][name]["novel_views"]["psnr"] == pytest.approx(
                one["baselines"][name]["novel_views"]["psnr"], rel=1e-3), name
        nerfs = [torch.load(runs[n] / f"{label}.pt", weights_only=True)["model_state_dict"] for n in (1, 2)]
        assert set(nerfs[0]) == set(nerfs[1])
        for key in nerfs[0]:
            differences = (nerfs[1][key].float() - nerfs[0][key].float()).abs()
            assert differences.max() <= 1e-2 and (differences > 1e-4).float().mean() < 1e-3, key
        for name in (f"log/{label}_loss.jpg", f"log/{label}_fusionloss.jpg", f"log/{label}_vis.jpg",
                     f"render_gifs/{label}.gif", f"render_gifs/{label}_circle.gif", f"meshes/{label}.ply"):
            assert (runs[2] / name).is_file(), name
    summary = json.loads((runs[2] / "summary.json").read_text())
    assert [s["sequence"] for s in summary["scenes"]] == ["hydrant_000_c2", "hydrant_001_c2"]


def test_inputs_only_scenes_at_once_write_every_scenes_outputs(setup):
    out = setup / "out_at_once_inputs_only"
    demo.main(flags(setup, *SMALL_RUN, "-i", "0,1", "--iterations", "4", "--method", "inputs_only", "-o", str(out),
                    "--scenes_at_once", "2"))
    for label in ("hydrant_000_c2", "hydrant_001_c2"):
        record = json.loads((out / "metrics" / f"{label}.json").read_text())
        assert record["method"] == "inputs_only" and record["scenes_at_once"] == 2
        assert (out / f"{label}.pt").is_file() and not (out / "log" / f"{label}_fusionloss.jpg").exists()


def test_another_process_reproduces_a_scene_bit_for_bit(setup):
    """--seed and the scene index fix every draw: the NeRF's initialisation, the EFT's dropout, views, noise."""
    outs = [setup / "out_again_1", setup / "out_again_2"]
    for out in outs:
        done = subprocess.run([sys.executable, "demo.py", *flags(setup, *SMALL_RUN, "--iterations", "8", "--fusion_start",
                                                                 "4", "--seed", "3", "-o", str(out))],
                              cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
    label = "hydrant_000_c2"
    nerfs = [torch.load(out / f"{label}.pt", weights_only=True)["model_state_dict"] for out in outs]
    assert nerfs[0].keys() == nerfs[1].keys() and all(torch.equal(nerfs[0][k], nerfs[1][k]) for k in nerfs[0])
    records = [json.loads((out / "metrics" / f"{label}.json").read_text()) for out in outs]
    for record in records:
        del record["timings"]
    assert records[0] == records[1]
    for name in (f"render_gifs/{label}.gif", f"render_gifs/{label}_circle.gif", f"log/{label}_eft_grid.jpg"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------
# Configuration, the ablation, the baselines, checkpoints that do not fit


def test_yaml_config_then_flags_then_key_value(setup, tmp_path):
    from sparsefusion.demo_config import load_demo_config

    yaml = tmp_path / "demo.yaml"
    yaml.write_text("category: hydrant\ninput_views: 3\ndistill:\n  iterations: 50\n  nerf:\n    num_levels: 4\n")
    args = demo.parse_args(["--config", str(yaml), "-v", "4", "--iterations", "60", "distill.nerf.num_levels=6",
                            "seed=9"])
    config = demo.config_from_args(args)
    assert (config.input_views, config.distill.iterations, config.distill.nerf.num_levels, config.seed) == (4, 60, 6, 9)
    assert load_demo_config(yaml).distill.iterations == 50
    with pytest.raises(UserError, match="bogus"):
        load_demo_config(yaml, ["distill.bogus=1"])


def test_each_upstream_quirks_fix_is_reachable_from_the_command_line(setup):
    from sparsefusion.models import load_models

    config = demo.config_from_args(demo.parse_args(flags(setup, "high_noise=noised", "resize_mode=exact",
                                                         "distill.eval_perturb=false")))
    assert demo.open_dataset(config, "hydrant").config.resize_mode == "exact"
    assert load_models("hydrant", config, "cpu").vldm.config.high_noise == "noised"
    assert config.distill.eval_perturb is False
    with pytest.raises(UserError, match="high_noise must be one of 'upstream', 'noised', got 'loud'"):
        demo.config_from_args(demo.parse_args(flags(setup, "high_noise=loud")))


def test_plms_steps_sets_the_guidance_step_count_and_zero_keeps_the_checkpoints(setup):
    from sparsefusion.models import load_models

    stored = load_models("hydrant", demo.config_from_args(demo.parse_args(flags(setup))), "cpu").vldm
    models = load_models("hydrant", demo.config_from_args(demo.parse_args(flags(setup, "plms_steps=20"))), "cpu")
    assert stored.config.plms_steps == 50 and models.vldm.config.plms_steps == 20
    calls = []
    latents = torch.zeros(1, 4, models.vldm.config.image_size, models.vldm.config.image_size)
    features = torch.zeros(1, models.vldm.config.unet.cond_images_channels, *latents.shape[-2:])
    models.vldm.denoise(latents, features, 0.25, model=lambda x, *rest: calls.append(x) or torch.zeros_like(x))
    assert len(calls) == int(0.25 * 2 * 20) + 1  # truncated steps, one model call each, the first two
    with pytest.raises(UserError, match="plms_steps must be 0 or more, got -1"):
        demo.config_from_args(demo.parse_args(flags(setup, "plms_steps=-1")))


@pytest.mark.parametrize("scale", ["0", "1.5"])
def test_a_noise_level_scale_outside_zero_to_one_is_refused_naming_upstreams(setup, scale):
    with pytest.raises(UserError, match=r"distill.noise_level_scale must be in \(0, 1\], got .*=1 \(upstream"):
        demo.config_from_args(demo.parse_args(flags(setup, f"distill.noise_level_scale={scale}")))


def test_no_views_per_step_is_refused_naming_upstreams():
    with pytest.raises(UserError, match=r"^distill.views_per_step must be at least 1, got 0; .*=1 \(upstream's"):
        demo.config_from_args(demo.parse_args(flags(Path("."), "distill.views_per_step=0")))


def test_help_lists_every_field_with_its_default():
    done = subprocess.run([sys.executable, "demo.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for line in ("distill.nerf.num_levels = 16", "distill.method = 'sparsefusion'", "generate.scenes = 0",
                 "image_size = 0", "baselines = False"):
        assert line in done.stdout, line


@pytest.fixture(scope="module")
def ablation_with_baselines(setup):
    """Run the input-views-only NeRF with the baselines scored; return the scene's metrics record."""
    out = setup / "out_ablation"
    demo.main(flags(setup, *SMALL_RUN, "--method", "inputs_only", "-o", str(out), "baselines=true"))
    return json.loads((out / "metrics" / "hydrant_000_c2.json").read_text())


def test_inputs_only_fits_the_input_views_alone(ablation_with_baselines):
    record = ablation_with_baselines
    assert record["method"] == "inputs_only" and record["config"]["method"] == "inputs_only"
    novel = record["baselines"]["eft"]["views"]  # the views showing no input frame
    assert novel and not set(novel) & set(record["input_views"])
    frames = record["frames"]
    by_hand = {key: float(np.mean([frames[v][key] for v in novel])) for key in ("psnr", "ssim")}
    assert record["novel_views"]["psnr"] == pytest.approx(by_hand["psnr"])
    assert record["novel_views"]["ssim"] == pytest.approx(by_hand["ssim"])


def test_baselines_are_scored_on_the_novel_views(ablation_with_baselines):
    record = ablation_with_baselines
    novel = record["baselines"]["eft"]["views"]
    assert set(record["baselines"]) == {"eft", "vldm", "nearest_input"}
    for name, result in record["baselines"].items():
        assert result["views"] == novel and len(result["frames"]) == len(novel)
        means = result["novel_views"]
        assert np.isfinite(means["psnr"]) and 0 < means["ssim"] <= 1, name


def test_repeats_of_an_input_frame_are_not_novel_views():
    from sparsefusion.reconstruct import novel_views

    scene = SimpleNamespace(images=torch.zeros(6, 3, 4, 4), frame_numbers=torch.tensor([0, 0, 1, 2, 2, 3]))
    assert novel_views(scene, [1, 3]) == [2, 5]


def test_nearest_input_view_is_the_closest_viewing_direction():
    from sparsefusion.baselines import nearest_input_views
    from sparsefusion.cameras import PerspectiveCameras, look_at_view_transform

    angles = torch.tensor([0.0, 0.5, 1.4, 2.0, 3.0, 4.5])
    eye = torch.stack([6 * angles.cos(), torch.full_like(angles, 1.0), 6 * angles.sin()], dim=-1)
    R, T = look_at_view_transform(eye, torch.zeros(1, 3), torch.tensor([[0.0, 1.0, 0.0]]))
    cameras = PerspectiveCameras(R=R, T=T, focal_length=torch.ones(6, 2), principal_point=torch.zeros(6, 2),
                                 image_size=torch.full((6, 2), 32.0))
    inputs = [1, 4]
    expected = [min(range(2), key=lambda k: abs(float(angles[i] - angles[inputs[k]]))) for i in range(6)]
    assert nearest_input_views(cameras, inputs).tolist() == expected


def test_checkpoints_that_do_not_fit_together_are_named(setup, tmp_path, capsys):
    vldm = VLDM(VLDMConfig(unet=UnetConfig.small(cond_images_channels=8), image_size=SIZE // 8))
    save_vldm(vldm, tmp_path / "vldm8.pt")
    with pytest.raises(SystemExit):
        demo.main(flags(setup, *SMALL_RUN, "-l", str(tmp_path / "vldm8.pt")))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "makes 16-channel features but the VLDM at" in err and "vldm8.pt takes 8" in err


def test_an_image_size_the_models_do_not_use_is_refused(setup, capsys):
    with pytest.raises(SystemExit):
        demo.main(flags(setup, *SMALL_RUN, "--image_size", "64"))
    assert "--image_size 64 does not match the models, which work at 32" in capsys.readouterr().err


def test_a_truncated_mini_checkpoint_names_the_file_and_the_fix(setup, tmp_path, monkeypatch, capsys):
    from sparsefusion import models

    mini = tmp_path / "mini"
    mini.mkdir()
    (mini / "eft.pt").write_bytes((setup / "eft.pt").read_bytes()[:3000])
    monkeypatch.setattr(models, "MINI_FOLDER", mini)
    with pytest.raises(SystemExit):
        demo.main(flags(setup, *SMALL_RUN, "-e", str(mini / "eft.pt")))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(mini / "eft.pt") in err[0] and "git checkout -- checkpoints/mini" in err[0]
    (mini / "eft.pt").unlink()
    with pytest.raises(SystemExit):
        demo.main(flags(setup, *SMALL_RUN, "-e", str(mini / "eft.pt")))
    assert "EFT checkpoint not found at" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Failures: found up front, all at once; divergence; interruption; reruns


def test_every_problem_is_reported_at_once_before_any_work(setup, tmp_path, capsys):
    data = shutil.copytree(setup / "data", tmp_path / "data")
    scene_1 = sorted((data / "hydrant").glob("*_001"))[0]
    (scene_1 / "images" / "frame000005.jpg").unlink()  # a bad scene after the first
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(flags(setup, "-r", str(data), "-i", "0,1,7", "-e", "missing/eft.pt", "-l", str(tmp_path),
                        "-o", str(a_file / "out"), *SMALL_RUN))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines) and len(lines) == 5, lines
    assert "EFT checkpoint not found at missing/eft.pt" in lines[0]
    assert f"VLDM checkpoint {tmp_path} is a folder, not a file" in lines[1]
    assert "-i/--idx 7 is out of range: hydrant has 2 scenes (0..1)" in lines[2]
    assert "hydrant scene 1: image not found: " in lines[3] and "frame000005.jpg" in lines[3]
    assert "output folder -o" in lines[4] and "is not writable" in lines[4]


def test_a_scene_whose_cameras_are_unusable_is_refused_before_any_work(setup, tmp_path, capsys, monkeypatch):
    from sparsefusion.data.toy import save_toy, toy_path

    scenes = [demo.open_dataset(demo.config_from_args(demo.parse_args(flags(setup))), "hydrant")[i] for i in (0, 1)]
    scenes[1].cameras.R[3] = 0.0  # a degenerate camera: upstream's demo ran it to NaN metrics
    save_toy(tmp_path / "toy", "hydrant", scenes)
    with pytest.raises(SystemExit):
        demo.main(flags(setup, "-d", "co3d_toy", "-r", str(tmp_path / "toy"), "-i", "0,1", "-o", str(tmp_path / "out"),
                        *SMALL_RUN))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hydrant scene 1 (" in err[0] and "cameras" not in err[0].split(":")[0]
    assert "an R that is not a rotation (views [3]); fix its annotations" in err[0]
    assert not (tmp_path / "out").exists() and toy_path(tmp_path / "toy", "hydrant").is_file()


def test_a_diverging_scene_stops_in_one_line_without_nan_metrics(setup, tmp_path, capsys, monkeypatch):
    from sparsefusion.distill import Distillation

    step = Distillation.step

    def poison_at_iteration_2(distillation, iteration):
        losses = step(distillation, iteration)
        if iteration == 2:
            with torch.no_grad():
                next(distillation.nerf.parameters()).fill_(float("nan"))
        return losses

    monkeypatch.setattr(Distillation, "step", poison_at_iteration_2)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        demo.main(flags(setup, *SMALL_RUN, "-o", str(out), "distill.log_every=2"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: hydrant_000_c2: the NeRF diverged (weights NaN or infinite by iteration 2), so the "
                       "scene has no metrics; check its cameras and images, or lower distill.lr")
    assert not (out / "metrics").exists() and not (out / "summary.json").exists()


def test_ctrl_c_during_a_gif_write_is_one_line_and_leaves_no_partial_file(setup, tmp_path, capsys, monkeypatch):
    from sparsefusion import reconstruct
    from sparsefusion.atomic_files import atomic_path

    def interrupted(frames, path, **kwargs):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"GIF89a")
            raise KeyboardInterrupt

    monkeypatch.setattr(reconstruct, "write_gif", interrupted)
    out = tmp_path / "out"
    assert demo.main(flags(setup, *SMALL_RUN, "-o", str(out))) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "hydrant_000_c2: 14/14 (100%)" in err  # stderr is no terminal: progress comes as lines
    assert err.strip().splitlines()[-1] == (f"interrupted: the scenes finished so far are in {out}; rerun with "
                                            f"skip_done=true to go on from there")
    assert not [path for path in out.rglob("*") if path.name.startswith(".")]


def test_skip_done_reuses_complete_scenes_and_old_temporaries_are_removed(setup, run, tmp_path, capsys, monkeypatch):
    from sparsefusion import reconstruct

    out = shutil.copytree(run[0], tmp_path / "out")
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = out / "render_gifs" / f".hydrant_000_c2.gif.partial-{finished.pid}-q9w8.gif"
    stale.write_bytes(b"GIF89a")
    monkeypatch.setattr(reconstruct, "reconstruct_scene", lambda *args, **kwargs: pytest.fail("recomputed"))
    demo.main(flags(setup, *SMALL_RUN, "-o", str(out), "skip_done=true"))
    assert "hydrant_000_c2: done by an earlier run, skipped (skip_done)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [s["sequence"] for s in summary["scenes"]] == ["hydrant_000_c2"]
    assert summary["mean"]["psnr"] == pytest.approx(run[1]["psnr"])
    assert not stale.exists()


def test_previews_are_labelled(run):
    out, _ = run
    from sparsefusion.outputs import LABEL_HEIGHT

    preview = imageio.imread(out / "log" / "hydrant_000_c2_vis.jpg")
    assert preview.shape[:2] == (SIZE + LABEL_HEIGHT, 2 * SIZE)


def test_with_several_processes_checkpoint_contents_are_checked_before_spawning(setup, tmp_path, capsys, monkeypatch):
    from sparsefusion import distributed

    vldm = VLDM(VLDMConfig(unet=UnetConfig.small(cond_images_channels=8), image_size=SIZE // 8))
    save_vldm(vldm, tmp_path / "vldm8.pt")
    monkeypatch.setattr(distributed, "launch", lambda *args, **kwargs: pytest.fail("spawned"))
    with pytest.raises(SystemExit):
        demo.main(flags(setup, *SMALL_RUN, "-g", "2", "-l", str(tmp_path / "vldm8.pt")))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "makes 16-channel features but the VLDM at" in err[0]


def test_help_imports_neither_torchvision_nor_lpips():
    script = ("import runpy, sys\nsys.argv = ['demo.py', '--help']\ntry:\n    runpy.run_path('demo.py', "
              "run_name='__main__')\nexcept SystemExit:\n    pass\nprint(sorted({'torchvision', 'lpips', 'skimage', "
              "'matplotlib'} & set(sys.modules)), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "[]"


def test_sigterm_stops_like_ctrl_c_and_its_handler_is_restored(setup, tmp_path, capsys, monkeypatch):
    import os
    import signal

    from sparsefusion import reconstruct

    monkeypatch.setattr(reconstruct, "write_gif", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM))
    assert demo.main(flags(setup, *SMALL_RUN, "-o", str(tmp_path / "out"))) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interrupted: the scenes finished so far")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

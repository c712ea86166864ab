"""Training: config layering, the step's inputs, learning, checkpoints, resume, and DDP across two processes."""

import importlib.util
import os
import runpy
import shutil
import signal
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from sparsefusion.external.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution
from sparsefusion.cameras import PerspectiveCameras
from sparsefusion.checkpoint import load_file, save_atomic
from sparsefusion.data.synthetic import generate_dataset
from sparsefusion.distributed import Rank, launch
from sparsefusion.eft import load_eft
from sparsefusion.errors import UserError
from sparsefusion.joint_objective import colors_at_rays, draw_query_and_context_size, training_batch, valid_loss_mask
from sparsefusion.trainer import Trainer, check_inputs, run_training
from sparsefusion.outputs import LABEL_HEIGHT
from sparsefusion.relative_cameras import relative_cameras
from sparsefusion.training import check_config, load_config
from sparsefusion.vae import load_latent_codec, read_vae, save_vae
from sparsefusion.vae_objective import VAEModel, kl_to_standard_normal, perceptual_model
from sparsefusion.vldm import VLDM

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "train_small.yaml"
CPU = torch.device("cpu")




@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Three 64×64 training scenes of 12 frames."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, categories=("hydrant",), scenes=3, frames=12, image_sizes=((64, 64),), eval_scenes=0,
                     show_progress=False)
    return root


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    """A checkpoint of our AutoencoderKL in the small configuration, as save_vae writes it."""
    config = load_config(SMALL, ["category=hydrant"]).autoencoder
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "small-vae.ckpt"
    return save_vae(AutoencoderKL(config), path)


@pytest.fixture
def small_config(data_root, vae_path, tmp_path):
    """Return a function building the small TrainConfig on the synthetic scenes, with key=value overrides."""
    def build(*overrides, exp_dir=tmp_path / "exp"):
        base = ["category=hydrant", "dataset=synthetic", f"root={data_root}", f"vae={vae_path}",
                f"exp_dir={exp_dir}", "tensorboard=false", "vis_itr=0", "num_workers=0"]
        return load_config(SMALL, base + list(overrides))
    return build


def single_rank():
    return Rank(rank=0, local_rank=0, world_size=1, device=CPU)


# ---------------------------------------------------------------------------------------------
# Configuration


def test_defaults_are_upstreams_and_layers_override_in_order(tmp_path):
    config = load_config(None, [], category="hydrant")
    assert (config.lr, config.lr_step, config.lr_gamma) == (5e-5, 50000, 0.5)
    assert (config.diffusion_batch_size, config.views_per_scene, list(config.num_input_range)) == (12, 20, [2, 6])
    assert (config.save_itr, config.archive_itr, config.vis_itr) == (1000, 50000, 100)
    assert (config.subset, config.split, config.feature_scale, config.n_points) == ("fewview_train", "train", 8, 20)
    assert config.exp_dir == "output/sparsefusion_exp/demo_train/hydrant_joint"
    assert config.root == "data/co3d"

    yaml = tmp_path / "config.yaml"
    yaml.write_text("category: teddybear\nvis_itr: 7\nsave_itr: 9\neft:\n  n_layers: 2\n")
    config = load_config(yaml, ["save_itr=11", "vldm.cond_drop_prob=0.2"], category="hydrant", dataset="synthetic")
    assert (config.category, config.vis_itr, config.save_itr) == ("hydrant", 7, 11)  # flag over YAML, override last
    assert (config.eft.n_layers, config.vldm.cond_drop_prob, config.root) == (2, 0.2, "data/synthetic")


@pytest.mark.parametrize("overrides, message", [
    (["bogus=1"], "bogus"),
    (["eft.n_layer=2"], "n_layer"),
    (["iterations=many"], "iterations"),
    (["precision=fp16"], "precision"),
    (["num_input_range=[3,3]"], "num_input_range"),
    (["eft.hidden_dim=32"], "cond_images_channels"),
])
def test_bad_settings_fail_naming_them(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(SMALL, ["category=hydrant"] + overrides)


def test_train_py_maps_flags_to_fields():
    cli = runpy.run_path(str(ROOT / "train.py"), run_name="train_cli")
    args = cli["parse_args"](["-c", "hydrant", "-g", "2", "-p", "3", "-d", "synthetic", "-r", "somewhere",
                              "-a", "vae.ckpt", "-b", "gloo", "--config", str(SMALL), "iterations=5"])
    config = cli["config_from_args"](args)
    assert (config.category, config.gpus, config.port, config.dataset) == ("hydrant", 2, 3, "synthetic")
    assert (config.root, config.vae, config.backend, config.iterations) == ("somewhere", "vae.ckpt", "gloo", 5)
    assert config.eft.hidden_dim == 16  # from the YAML


def test_missing_vae_names_the_path_and_where_to_get_it(small_config, tmp_path):
    config = small_config(f"vae={tmp_path / 'nowhere.ckpt'}")
    for check in (check_inputs, run_training):
        with pytest.raises(UserError, match=r"nowhere\.ckpt.*huggingface"):
            check(config)


# ---------------------------------------------------------------------------------------------
# The step's inputs


def test_context_sizes_follow_randint_with_exclusive_high():
    sizes = set()
    for seed in range(200):
        torch.manual_seed(seed)
        query, size = draw_query_and_context_size(20, [2, 6])
        torch.manual_seed(seed)
        assert torch.equal(query, torch.randperm(20)[:1])  # upstream's draws, in its order
        assert size == int(torch.randint(2, 6, (1,)))
        sizes.add(size)
    assert sizes == {2, 3, 4, 5}


def test_colors_at_rays_reads_bilinearly_at_minus_xy_with_aligned_corners():
    height, width = 9, 13
    rows, cols = torch.meshgrid(torch.arange(height.__float__()), torch.arange(width.__float__()), indexing="ij")
    images = torch.stack([cols, rows, 2 * cols - rows])[None]  # linear in the pixel indices: bilinear is exact
    xys = torch.rand(1, 5, 7, 2) * 2 - 1
    u = (1 - xys[..., 0]) / 2 * (width - 1)  # NDC +x points left: x = 1 is column 0
    v = (1 - xys[..., 1]) / 2 * (height - 1)
    expected = torch.stack([u, v, 2 * u - v], dim=-1)
    torch.testing.assert_close(colors_at_rays(images, xys), expected, atol=1e-4, rtol=0)


def test_loss_mask_shrinks_the_valid_region_and_thresholds_it():
    valid = torch.zeros(1, 1, 64, 64)
    valid[..., :, :32] = 1.0
    mask = valid_loss_mask(valid, 8)
    assert mask.shape == (1, 1, 8, 8)
    assert torch.equal(mask[..., :4], torch.ones(1, 1, 8, 4)) and not mask[..., 4:].any()
    assert torch.equal(valid_loss_mask(torch.full((1, 1, 64, 64), 0.61), 8), torch.ones(1, 1, 8, 8))
    assert not valid_loss_mask(torch.full((1, 1, 64, 64), 0.6), 8).any()  # > 0.6, as upstream


def test_training_batch_puts_the_query_at_the_origin(small_config):
    config = small_config()
    trainer = Trainer(config, single_rank())
    batch = training_batch(trainer.dataset[(0, 0)], trainer.objective.codec, config, CPU)
    torch.testing.assert_close(batch.query_cameras.R, torch.eye(3)[None], atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.query_cameras.T, torch.zeros(1, 3), atol=1e-6, rtol=0)
    assert 2 <= batch.context_images.shape[0] <= 5
    assert batch.rays.lengths.shape == (1, 8, 8, config.n_points)
    assert batch.latents.shape == (1, 4, 8, 8) and batch.target_colors.shape == (1, 8, 8, 3)
    assert batch.far - batch.near == pytest.approx(2 * config.depth_margin)


# ---------------------------------------------------------------------------------------------
# Learning, outputs and checkpoints


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(small_config):
    config = small_config("iterations=15", "lr=1e-3", "save_itr=1000")
    trainer = Trainer(config, single_rank())
    scene = trainer.dataset[(0, 0)]

    def fixed_batch_losses():
        torch.manual_seed(123)  # the same query, context, noise, times and dropout before and after
        batch = training_batch(scene, trainer.objective.codec, config, CPU)
        with torch.no_grad():
            losses = trainer.model(batch)
        return {name: float(losses[name]) for name in ("total", "diffusion", "color")}

    before = fixed_batch_losses()
    assert trainer.train() == 15
    after = fixed_batch_losses()
    assert after["color"] < 0.6 * before["color"]
    assert after["diffusion"] < before["diffusion"]
    assert after["total"] < 0.8 * before["total"]


def test_outputs_and_checkpoints_in_upstreams_layout(small_config, tmp_path):
    exp = tmp_path / "run"
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    config = small_config("iterations=2", "save_itr=2", "archive_itr=2", "vis_itr=2", f"tensorboard={tensorboard}",
                          exp_dir=exp)
    Trainer(config, single_rank()).train()

    vldm_ckpt = load_file(exp / "ckpt_latest.pt", "VLDM checkpoint")
    eft_ckpt = load_file(exp / "ckpt_latest_eft.pt", "EFT checkpoint")
    assert set(vldm_ckpt) == {"step", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict",
                              "config", "train_config", "rng_state", "checksum"}
    assert set(eft_ckpt) == {"step", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "config",
                             "checksum"}
    assert vldm_ckpt["step"] == eft_ckpt["step"] == 2
    assert vldm_ckpt["train_config"] == asdict(config)
    assert eft_ckpt["scheduler_state_dict"]["last_epoch"] == 2
    # demo.py's strict loaders rebuild the small architectures from the stored configs
    assert load_eft(exp / "ckpt_latest_eft.pt").config.hidden_dim == config.eft.hidden_dim
    assert VLDM.from_checkpoint(exp / "ckpt_latest.pt").config == config.vldm
    assert (exp / "ckpt_000002.pt").is_file() and (exp / "ckpt_000002_eft.pt").is_file()
    assert not list(exp.glob(".*"))  # no temporary or pending file left behind
    assert (exp / "config.yaml").is_file()
    assert list((exp / "tensorboard").glob("events.*")) or not tensorboard

    import imageio.v2 as imageio
    image = imageio.imread(exp / "log" / "train_000002.jpg")
    assert image.shape[0] == 64 + LABEL_HEIGHT and image.shape[1] % 64 == 0 and 5 <= image.shape[1] // 64 <= 8
    assert image[:LABEL_HEIGHT].max() > 128 and image[:LABEL_HEIGHT].min() < 64  # V + 3 panels, captioned


def test_resumed_run_matches_an_uninterrupted_one(small_config, tmp_path):
    # repeat=2 over 3 scenes: 6 steps per epoch; the stop at step 3 falls mid-scene and mid-epoch.
    common = ("repeat=2", "save_itr=3", "vis_itr=3", "lr=1e-3")
    straight = small_config(*common, "iterations=8", "archive_itr=3", exp_dir=tmp_path / "straight")
    Trainer(straight, single_rank()).train()

    Trainer(small_config(*common, "iterations=3", exp_dir=tmp_path / "split"), single_rank()).train()
    resumed = Trainer(small_config(*common, "iterations=8", exp_dir=tmp_path / "split"), single_rank())
    at_stop = load_file(tmp_path / "straight" / "ckpt_000003.pt", "checkpoint")
    assert resumed.step == 3
    assert_same(resumed.objective.optimizers[0].state_dict(), at_stop["optimizer_state_dict"])
    resumed.train()

    for name in ("ckpt_latest.pt", "ckpt_latest_eft.pt"):
        expected = load_file(tmp_path / "straight" / name, "checkpoint")
        got = load_file(tmp_path / "split" / name, "checkpoint")
        assert got["step"] == expected["step"] == 8
        for key in ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "rng_state"):
            assert_same(got.get(key), expected.get(key))


def assert_same(a, b):
    """Assert two nested checkpoint structures are equal, tensors exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# ---------------------------------------------------------------------------------------------
# DDP


def _train_and_dump(rank, config, out_dir):
    torch.set_num_threads(1)  # two processes on a two-core machine
    trainer = Trainer(config, rank)
    trainer.train()
    torch.save({"parameters": {name: p.detach() for name, p in trainer.model.named_parameters()},
                "losses": trainer.last_losses}, Path(out_dir) / f"rank{rank.rank}.pt")


def test_two_gloo_processes_keep_identical_parameters(small_config, tmp_path):
    torch.manual_seed(0)
    config = small_config("iterations=2", "gpus=2", "backend=gloo", "lr=1e-3", "save_itr=2")
    launch(_train_and_dump, 2, port=7, backend="gloo", args=(config, tmp_path))
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert first["losses"]["total"] != second["losses"]["total"]  # each rank trained on its own draws...
    assert_same(first["parameters"], second["parameters"])        # ...with gradients averaged across ranks
    fresh = Trainer(small_config("iterations=2", exp_dir=tmp_path / "fresh"), single_rank())
    assert not torch.equal(fresh.objective.vldm.unet.final_conv.weight, first["parameters"]["vldm.unets.0.final_conv.weight"])
    checkpoint = load_file(Path(config.exp_dir) / "ckpt_latest.pt", "checkpoint")
    assert checkpoint["step"] == 2 and len(checkpoint["rng_state"]) == 2
    assert not torch.equal(checkpoint["rng_state"][0]["torch"], checkpoint["rng_state"][1]["torch"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_steps_match_fp32_and_resume(small_config, tmp_path):
    cuda = torch.device("cuda", 0)
    rank = Rank(rank=0, local_rank=0, world_size=1, device=cuda)
    trainer = Trainer(small_config("iterations=2", "precision=bf16", "vis_itr=2"), rank)
    scene = trainer.dataset[(0, 0)]

    def fixed_batch_loss(precision):
        torch.manual_seed(7)
        torch.cuda.manual_seed(7)
        batch = training_batch(scene, trainer.objective.codec, trainer.config, cuda)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return float(trainer.model(batch)["total"])

    fp32, bf16 = fixed_batch_loss("fp32"), fixed_batch_loss("bf16")
    assert abs(bf16 - fp32) < 0.05 * fp32
    trainer.train()
    resumed = Trainer(small_config("iterations=3", "precision=bf16"), rank)
    assert resumed.step == 2 and resumed.train() == 3
    state = load_file(Path(resumed.config.exp_dir) / "ckpt_latest.pt", "checkpoint")["rng_state"][0]
    assert state["cuda"] is not None


# ---------------------------------------------------------------------------------------------
# Several queries per step, the VAE stage, stopping, partial checkpoints


def test_several_queries_share_the_context_each_in_its_own_frame(small_config):
    config = small_config("queries_per_step=3")
    trainer = Trainer(config, single_rank())
    scene = trainer.dataset[(0, 0)]
    torch.manual_seed(5)
    batch = training_batch(scene, trainer.objective.codec, config, CPU)
    n_context = batch.context_images.shape[0]
    assert len(batch.query_cameras) == 3 and len(batch.context_cameras) == 3 * n_context
    torch.testing.assert_close(batch.query_cameras.R, torch.eye(3).expand(3, 3, 3), atol=1e-6, rtol=0)
    assert batch.latents.shape == (3, 4, 8, 8) and batch.rays.lengths.shape[0] == 3
    # the same context camera seen from two queries: its pose relative to each query is the scene's
    torch.manual_seed(5)
    query, size = draw_query_and_context_size(len(scene), config.num_input_range, 3)
    context = torch.randperm(len(scene))[:size]
    assert size == n_context
    for q in range(3):
        expected = PerspectiveCameras.cat([scene.cameras[int(query[q])], scene.cameras[context]])
        relative = relative_cameras(expected, 0, center_at_origin=True)
        got = batch.context_cameras[q * n_context:(q + 1) * n_context]
        torch.testing.assert_close(got.R, relative.R[1:], atol=1e-5, rtol=0)
        torch.testing.assert_close(got.T, relative.T[1:], atol=1e-4, rtol=0)
    losses = trainer.model(batch)
    assert losses["rgb"].shape == (3, 8, 8, 3) and torch.isfinite(losses["total"])


def seeded_reconstruction_loss(trainer, images):
    """Return a VAE-stage trainer's mean L1 reconstruction error of images, its posterior draw seeded."""
    torch.manual_seed(9)
    with torch.no_grad():
        return float(trainer.model(images)["reconstruction"])


def test_vae_stage_learns_and_writes_a_vae_file_with_its_scale(small_config, tmp_path):
    config = small_config("stage=vae", "iterations=12", "lr=2e-3", "save_itr=12", "vis_itr=12", "views_per_scene=6",
                          exp_dir=tmp_path / "vae")
    trainer = Trainer(config, single_rank())
    images = trainer.dataset[(0, 0)].images
    before = seeded_reconstruction_loss(trainer, images)
    assert trainer.train() == 12
    assert seeded_reconstruction_loss(trainer, images) < 0.7 * before
    ckpt = load_file(tmp_path / "vae" / "ckpt_latest_vae.pt", "VAE checkpoint")
    assert set(ckpt) == {"step", "state_dict", "config", "scale_factor", "optimizer_state_dict",
                         "scheduler_state_dict", "train_config", "rng_state", "checksum"}
    reference = torch.cat([trainer.dataset[(0, i)].images for i in range(len(trainer.dataset))])
    with torch.no_grad():
        modes = trainer.objective.vae.eval().encode(reference * 2 - 1).mode()
    assert ckpt["scale_factor"] == pytest.approx(1 / float(modes.std()), rel=1e-4)
    codec = load_latent_codec(tmp_path / "vae" / "ckpt_latest_vae.pt")  # load_vae reads the training file as it is
    assert codec.config.scale_factor == ckpt["scale_factor"]
    assert (tmp_path / "vae" / "log" / "train_000012.jpg").is_file()


def test_decoder_only_vae_stage_starts_from_init_vae_and_keeps_its_encoder(small_config, tmp_path):
    first = small_config("stage=vae", "iterations=4", "lr=2e-3", "save_itr=4", "views_per_scene=6",
                         exp_dir=tmp_path / "first")
    assert Trainer(first, single_rank()).train() == 4
    start = tmp_path / "first" / "ckpt_latest_vae.pt"
    config = small_config("stage=vae", "iterations=12", "lr=2e-3", "save_itr=12", "views_per_scene=6",
                          f"init_vae={start}", "vae_trains=decoder", exp_dir=tmp_path / "decoder")
    trainer = Trainer(config, single_rank())
    initial, _ = read_vae(start)
    torch.testing.assert_close(trainer.objective.vae.state_dict(), initial.state_dict(), rtol=0, atol=0)
    images = trainer.dataset[(0, 0)].images
    before = seeded_reconstruction_loss(trainer, images)
    assert trainer.train() == 12
    assert seeded_reconstruction_loss(trainer, images) < 0.9 * before
    trained, scale = read_vae(tmp_path / "decoder" / "ckpt_latest_vae.pt")
    for name, value in trained.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.")):
            torch.testing.assert_close(value, initial.state_dict()[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(trained.decoder.conv_out.weight, initial.decoder.conv_out.weight)
    assert scale == load_file(start, "VAE checkpoint")["scale_factor"]  # the same latents, the same scale


def test_init_vae_belongs_to_the_vae_stage(small_config):
    with pytest.raises(UserError, match="init_vae and vae_trains are settings of stage=vae"):
        check_config(small_config("stage=joint", "vae_trains=decoder"))


def test_kl_term_is_the_closed_form_of_diagonal_gaussians():
    moments = torch.randn(2, 8, 3, 3)
    posterior = DiagonalGaussianDistribution(moments)
    mean, logvar = moments.chunk(2, dim=1)
    expected = [torch.distributions.kl_divergence(
        torch.distributions.Normal(mean[i], (0.5 * logvar[i]).exp()), torch.distributions.Normal(0.0, 1.0)).sum()
        for i in range(2)]
    torch.testing.assert_close(kl_to_standard_normal(posterior), torch.stack(expected))


class MeanAbsoluteLPIPS(torch.nn.Module):
    """Stands in for LPIPS: the mean absolute difference per image of inputs in [-1, 1], shaped (B, 1, 1, 1)."""

    def forward(self, a, b):
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_the_vae_loss_adds_the_perceptual_term_per_pixel_as_ldm():
    torch.manual_seed(0)
    small = AutoencoderKLConfig(ch=8, ch_mult=[1, 2], num_res_blocks=1, norm_groups=4)
    vae, images = AutoencoderKL(small), torch.rand(2, 3, 16, 16)
    plain = VAEModel(vae, kl_weight=1e-3)
    torch.manual_seed(1)
    without = plain(images)
    torch.manual_seed(1)  # the same posterior sample
    with_term = VAEModel(vae, kl_weight=1e-3, perceptual_weight=0.5, lpips=MeanAbsoluteLPIPS())(images)
    expected = ((with_term["reconstructions"] + 1) / 2 - images).abs().mean() * 2  # the stand-in works in [-1, 1]
    torch.testing.assert_close(with_term["perceptual"], expected)
    torch.testing.assert_close(with_term["total"], without["total"] + 0.5 * expected)
    assert float(without["perceptual"]) == 0.0
    assert not any(name.startswith("lpips") for name in VAEModel(vae, 1e-3, 0.5, MeanAbsoluteLPIPS()).state_dict())


def test_the_perceptual_term_without_vgg_weights_is_one_line_naming_where_to_put_them(monkeypatch):
    assert perceptual_model(0.0, "cpu") is None
    monkeypatch.setattr("sparsefusion.vae_objective.build_lpips", lambda *args, **kwargs: None)
    with pytest.raises(UserError, match="perceptual_weight=1.0 needs LPIPS: LPIPS\\(vgg\\) unavailable.*SPARSEFUSION_VGG16"):
        perceptual_model(1.0, "cpu")


def test_a_stop_signal_saves_the_step_and_the_run_resumes(small_config, tmp_path):
    config = small_config("iterations=6", "save_itr=100", exp_dir=tmp_path / "stopped")
    trainer = Trainer(config, single_rank())
    draw = trainer.objective.batch
    calls = []

    def batch_then_signal(scene):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2, which completes
        return draw(scene)

    trainer.objective.batch = batch_then_signal
    assert trainer.train() == 2
    assert load_file(tmp_path / "stopped" / "ckpt_latest.pt", "checkpoint")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after train()
    assert Trainer(config, single_rank()).train() == 6


def test_half_a_checkpoint_is_refused_naming_both_files(small_config, tmp_path):
    config = small_config("iterations=1", "save_itr=1", exp_dir=tmp_path / "half")
    Trainer(config, single_rank()).train()
    (tmp_path / "half" / "ckpt_latest.pt").unlink()
    with pytest.raises(UserError, match=r"ckpt_latest_eft\.pt.*but not.*ckpt_latest\.pt"):
        Trainer(config, single_rank())


def test_the_loss_log_spans_resumed_runs_and_drops_rows_past_the_checkpoint(small_config, tmp_path):
    exp = tmp_path / "logged"
    Trainer(small_config("iterations=4", "log_itr=1", "save_itr=2", exp_dir=exp), single_rank()).train()
    log = exp / "log" / "losses.csv"
    with open(log, "a") as f:
        f.write("5,0.001,9.0,9.0,9.0\n")  # a row logged after the last checkpoint by a killed run
    Trainer(small_config("iterations=6", "log_itr=1", "save_itr=2", "vis_itr=6", exp_dir=exp), single_rank()).train()
    lines = log.read_text().splitlines()
    assert lines[0] == "step,lr,total,diffusion,color"
    assert [int(line.split(",")[0]) for line in lines[1:]] == [1, 2, 3, 4, 5, 6]
    assert all(float(line.split(",")[2]) < 9.0 for line in lines[1:])
    assert (exp / "log" / "_loss.png").is_file()


# ---------------------------------------------------------------------------------------------
# Failures: divergence, kills during saves, damaged checkpoint sets, settings that contradict the run


def train_argv(data_root, vae_path, exp_dir, *overrides):
    """train.py's command line for the small config on the synthetic scenes."""
    return ["--config", str(SMALL), "-c", "hydrant", "-d", "synthetic", "-r", str(data_root), "-a", str(vae_path),
            f"exp_dir={exp_dir}", "tensorboard=false", "vis_itr=0", "num_workers=0", *overrides]


def test_a_diverging_run_stops_in_one_line_and_keeps_its_good_checkpoint(data_root, vae_path, tmp_path, monkeypatch,
                                                                         capsys):
    from sparsefusion.joint_objective import JointObjective

    draw = JointObjective.batch
    calls = []

    def nan_from_step_3(objective, scene):
        calls.append(1)
        batch = draw(objective, scene)
        if len(calls) >= 3:
            batch.latents = batch.latents * float("nan")
        return batch

    monkeypatch.setattr(JointObjective, "batch", nan_from_step_3)
    exp = tmp_path / "diverged"
    train = runpy.run_path(str(ROOT / "train.py"), run_name="train_cli")
    with pytest.raises(SystemExit) as exit_info:
        train["main"](train_argv(data_root, vae_path, exp, "iterations=6", "save_itr=2", "log_itr=1"))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged: the loss became NaN or infinite between steps 3 and 3" in errors[0]
    assert f"{exp}'s checkpoint of step 2 is kept" in errors[0] and "lower lr" in errors[0]
    checkpoint = load_file(exp / "ckpt_latest.pt", "checkpoint")
    assert checkpoint["step"] == 2
    assert all(value.isfinite().all() for value in checkpoint["model_state_dict"].values())
    assert [line.split(",")[0] for line in (exp / "log" / "losses.csv").read_text().splitlines()[1:]] == ["1", "2"]


class Killed(BaseException):
    """Fault injection: the process dies here (nothing catches a BaseException)."""


def test_a_kill_between_the_renames_of_a_save_is_completed_on_restart(small_config, tmp_path, monkeypatch, capsys):
    exp = tmp_path / "killed"
    config = small_config("iterations=4", "save_itr=2", exp_dir=exp)
    trainer = Trainer(config, single_rank())
    replace = os.replace
    commit_renames = []

    def die_at_the_second_rename_of_step_4(source, target):
        if trainer.step == 4 and not Path(target).name.startswith("."):
            if commit_renames:
                raise Killed
            commit_renames.append(target)
        replace(source, target)

    monkeypatch.setattr(os, "replace", die_at_the_second_rename_of_step_4)
    with pytest.raises(Killed):
        trainer.train()
    monkeypatch.undo()
    assert load_file(exp / "ckpt_latest.pt", "x")["step"] == 4 and load_file(exp / "ckpt_latest_eft.pt", "x")["step"] == 2

    resumed = Trainer(config, single_rank())
    assert resumed.step == 4
    assert "completed the save of" in capsys.readouterr().err
    assert not list(exp.glob(".*"))
    assert load_file(exp / "ckpt_latest_eft.pt", "x")["step"] == 4


def test_temporaries_of_killed_saves_are_removed_at_start(small_config, tmp_path):
    exp = tmp_path / "orphans"
    config = small_config("iterations=1", "save_itr=1", exp_dir=exp)
    Trainer(config, single_rank()).train()
    finished = subprocess.Popen(["true"])
    finished.wait()
    orphans = [exp / ".ckpt_latest.pt.pending", exp / f".ckpt_latest.pt.pending.partial-{finished.pid}-a1b2.pending",
               exp / "log" / f".losses.csv.partial-{finished.pid}-c3d4.csv"]
    for path in orphans:
        path.write_bytes(bytes(1000))
    Trainer(config, single_rank())
    assert not any(path.exists() for path in orphans)


def test_a_damaged_checkpoint_set_names_what_can_repair_it(small_config, tmp_path):
    exp = tmp_path / "damaged"
    config = small_config("iterations=2", "save_itr=1", "archive_itr=1", exp_dir=exp)
    Trainer(config, single_rank()).train()
    shutil.copy(exp / "ckpt_000001_eft.pt", exp / "ckpt_latest_eft.pt")
    with pytest.raises(UserError, match=r"different steps \{'vldm': 2, 'eft': 1\}; copy a complete archived set over "
                                        r"them \(ckpt_\{step\}\* of steps \[1, 2\]\)"):
        Trainer(config, single_rank())
    for archived in exp.glob("ckpt_00000*"):
        archived.unlink()
    with pytest.raises(UserError, match="there is no archived set to restore; move the files away"):
        Trainer(config, single_rank())
    (exp / "ckpt_latest.pt").rename(exp / ".ckpt_latest.pt.pending")
    with pytest.raises(UserError, match=r"\.ckpt_latest\.pt\.pending holds the unfinished save of the other part"):
        Trainer(config, single_rank())
    assert (exp / ".ckpt_latest.pt.pending").is_file()  # what could repair the set is never deleted


def test_resuming_refuses_settings_that_define_the_run_and_applies_a_new_learning_rate(small_config, tmp_path, capsys):
    exp = tmp_path / "settings"
    Trainer(small_config("iterations=1", "save_itr=1", exp_dir=exp), single_rank()).train()
    with pytest.raises(UserError, match=r"other settings: eft\.n_layers=1 \(asked: 2\); image_size=64 \(asked: 32\); "
                                        r"a resumed run keeps them"):
        Trainer(small_config("iterations=2", "image_size=32", "eft.n_layers=2", exp_dir=exp), single_rank())
    resumed = Trainer(small_config("iterations=3", "lr=1e-3", "lr_step=2", exp_dir=exp), single_rank())
    assert "resuming with lr 0.001 (was 5e-05), lr_step 2 (was 50000)" in capsys.readouterr().err
    for optimizer, scheduler in zip(resumed.objective.optimizers, resumed.objective.schedulers):
        assert optimizer.param_groups[0]["lr"] == 1e-3 and scheduler.step_size == 2
    resumed.train()  # StepLR halves the new rate at step 2 as if it had been used from the start
    assert resumed.objective.optimizers[0].param_groups[0]["lr"] == pytest.approx(5e-4)
    assert "lr: 0.001" in (exp / "config.yaml").read_text()


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(small_config, tmp_path):
    exp = tmp_path / "older"
    Trainer(small_config("iterations=1", "save_itr=1", exp_dir=exp), single_rank()).train()
    for name in ("ckpt_latest.pt", "ckpt_latest_eft.pt"):  # as train.py wrote them before resize_mode existed
        contents = torch.load(exp / name, weights_only=False)
        if "train_config" in contents:
            del contents["train_config"]["resize_mode"]
            save_atomic(contents, exp / name)
    assert Trainer(small_config("iterations=2", exp_dir=exp), single_rank()).step == 1
    with pytest.raises(UserError, match=r"other settings: resize_mode='upstream' \(asked: 'exact'\)"):
        Trainer(small_config("iterations=2", "resize_mode=exact", exp_dir=exp), single_rank())


def test_every_bad_setting_is_named_at_once(tmp_path):
    with pytest.raises(UserError) as err:
        load_config(SMALL, ["category=hydrant", "iterations=-5", "port=12", "precision=fp16", "image_size=60"])
    lines = str(err.value).splitlines()
    assert len(lines) == 4
    assert lines[0] == "precision must be one of 'fp32', 'tf32', 'bf16', got 'fp16'"
    assert "iterations must be 0 (max_epochs passes) or more, got -5" in lines
    assert "-p/--port 12 must be a single digit 0-9 (the port is 1234{p}); e.g. -p 2" in lines
    assert lines[3] == "image_size 60 must be a multiple of feature_scale 8; e.g. image_size=56"  # a value that works
    broken = tmp_path / "broken.yaml"
    broken.write_text("category: hydrant\neft: {n_layers: 2\n")
    with pytest.raises(UserError, match=r"config file .*broken\.yaml is not valid YAML at line 3"):
        load_config(broken)


def test_missing_inputs_are_reported_together_before_any_work(small_config, tmp_path):
    config = small_config(f"vae={tmp_path / 'nowhere.ckpt'}", f"init_eft={tmp_path}", f"root={tmp_path / 'no_data'}")
    with pytest.raises(UserError) as err:
        run_training(config)
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert "VAE checkpoint not found at" in lines[0] and "init_eft checkpoint" in lines[1] and "is a folder" in lines[1]
    assert "no synthetic data for ['hydrant']" in lines[2]


def test_a_finished_run_says_there_is_nothing_to_train_and_progress_goes_to_redirected_stderr(small_config, tmp_path,
                                                                                           capsys):
    config = small_config("iterations=2", exp_dir=tmp_path / "done")
    Trainer(config, single_rank()).train()
    err = capsys.readouterr().err  # not a terminal: progress lines, not a bar
    assert f"checkpoints and logs go to {tmp_path / 'done'}" in err and "2/2 (100%)" in err
    assert Trainer(config, single_rank()).train() == 2
    assert "nothing to train: " in capsys.readouterr().err

"""Several scenes distilled at once reproduce the same scenes distilled one by one."""

from dataclasses import replace

import pytest
import torch

from sparsefusion.data.synthetic import render_synthetic_scene
from sparsefusion.distill import Distillation, run_distillation
from sparsefusion.guidance import DiffusionGuidance
from sparsefusion.models import Models
from sparsefusion.multi_scene import MultiSceneDistillation, run_multi_scene
from sparsefusion.schedule import truncated_steps
from sparsefusion.vldm import VLDM, VLDMConfig
from sparsefusion.external.imagen_unet import UnetConfig
from tests.test_distill import SIZE, INPUTS, RecordingCodec, SquaredLPIPS, small_config, tiny_eft

# Seeds chosen for their noise levels (iterations 3, 4, 5 of small_config(iterations=6, fusion_start=2)), with
# PLMS_STEPS = 10: seed 57 draws t = 0.30, 0.07, 0.99 (5, 1 and 10 steps, the last upstream's restart from t = 1
# on the clean latent), seed 1 draws 0.27, 0.45, 0.66 (5, 8, 10 steps), seed 2 0.23, 0.54, 0.96 (4, 10, 10):
# the first two guided steps batch scenes of different step counts (5, 5, 4 and 1, 8, 10), the third the restart.
SEEDS = (57, 1, 2)
PLMS_STEPS = 10


def conditioned_eps(x, log_snr, cond):
    """A UNet stand-in whose ε̂ depends, per sample, on its latent, its own noise level and its own features."""
    return torch.tanh(0.7 * x + 0.05 * log_snr.view(-1, 1, 1, 1) + cond[:, :x.shape[1]])


class RecordingVLDM(torch.nn.Module):
    """A real VLDM (its denoise and denoise_grouped), recording each call's noise levels."""

    def __init__(self):
        super().__init__()
        self.vldm = VLDM(VLDMConfig(unet=UnetConfig.small(cond_images_channels=16), image_size=SIZE // 8,
                                    plms_steps=PLMS_STEPS))
        self.levels = []

    def denoise(self, latents, cond, max_thres, model=None, generator=None):
        self.levels.append([max_thres])
        return self.vldm.denoise(latents, cond, max_thres, model=model, generator=generator)

    def denoise_grouped(self, latents, cond, max_thres, model=None, generators=None):
        self.levels.append(list(max_thres))
        return self.vldm.denoise_grouped(latents, cond, max_thres, model=model, generators=generators)


@pytest.fixture(scope="module")
def scenes():
    """Three different 32×32 synthetic scenes of six views."""
    return [render_synthetic_scene("hydrant", seed, n_views=6, image_hw=(SIZE, SIZE)).to_scene() for seed in (3, 4, 5)]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return Models(eft=tiny_eft(), codec=RecordingCodec(), vldm=RecordingVLDM(), unet=conditioned_eps,
                  lpips=SquaredLPIPS())


def distillations(scenes, models, config):
    return [Distillation(models, scene.cameras, scene.images, scene.masks, INPUTS, config, seed=seed)
            for scene, seed in zip(scenes, SEEDS)]


def run_both(scenes, models, config):
    """Return (histories, NeRF state dicts, final renders) of the scenes run one by one, then of them run at once."""
    results = []
    for together in (False, True):
        runs = distillations(scenes, models, config)
        if together:
            histories, _ = run_multi_scene(MultiSceneDistillation(runs))
        else:
            histories = [run_distillation(run)[0] for run in runs]
        renders = [run.render(run.cameras.scene[:2], size=16)[0] for run in runs]  # draws from each scene's generator
        results.append((histories, [run.nerf.state_dict() for run in runs], renders))
    return results


@pytest.mark.parametrize("views", [1, 2])
def test_scenes_at_once_reproduce_the_scenes_one_by_one(scenes, models, views):
    """Three scenes at once against each alone: every loss term of every iteration (bootstrap and guided, the
    guided ones at noise levels of different PLMS step counts, one at upstream's t ≥ 0.99 restart), the final
    NeRF parameters and renders, with views_per_step 1 and 2.

    Tolerance: everything runs in float32 and the only differences are the rounding of batched kernels (the
    stacked MLP's batched matmul against nn.Linear, sums over larger batches); these move values by ~1e-7
    relatively per iteration, and Adam, normalising tiny grid gradients, carries them to ~1e-5 of the parameters
    in 6 iterations at lr 1e-2 (measured: losses 2e-7 relative, parameters 1e-5, renders 1e-7). A wrong random
    draw, a swapped scene or a wrong PLMS schedule moves them by far more (the loss terms by 1e-2 or more), so
    rtol 1e-5 on losses, atol 1e-4 on parameters and 1e-5 on renders separate them with a margin of 10.
    """
    config = small_config(iterations=6, fusion_start=2, perceptual_start=4, views_per_step=views)
    models.vldm.levels.clear()
    (alone, alone_nerfs, alone_renders), (together, together_nerfs, together_renders) = run_both(scenes, models,
                                                                                                config)
    single_levels, grouped_levels = models.vldm.levels[:9], models.vldm.levels[9:]
    assert grouped_levels == [[single_levels[3 * s + i][0] for s in range(3)] for i in range(3)]
    steps = [[truncated_steps(t, PLMS_STEPS) for t in levels] for levels in grouped_levels]
    assert all(len(set(counts)) > 1 for counts in steps[:2]) and 0.99 in grouped_levels[2]
    for history_alone, history_together in zip(alone, together):
        assert len(history_together.rows) == config.iterations
        for row_alone, row_together in zip(history_alone.rows, history_together.rows):
            assert set(row_alone) == set(row_together)
            assert "diffusion_perceptual" in row_alone or "bootstrap_color" in row_alone or "diffusion_l1" in row_alone
            for name, value in row_alone.items():
                assert row_together[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    for nerf_alone, nerf_together in zip(alone_nerfs, together_nerfs):
        assert set(nerf_alone) == set(nerf_together)
        for name in nerf_alone:
            torch.testing.assert_close(nerf_together[name], nerf_alone[name], rtol=1e-3, atol=1e-4)
    for render_alone, render_together in zip(alone_renders, together_renders):
        torch.testing.assert_close(render_together, render_alone, rtol=1e-5, atol=1e-5)
    # ... and the scenes did differ from each other, so a swap would show
    assert not torch.allclose(alone_nerfs[0]["sigma_net.net.0.weight"], alone_nerfs[1]["sigma_net.net.0.weight"],
                              atol=1e-2)


def test_inputs_only_scenes_at_once_reproduce_them_one_by_one(scenes, models):
    config = small_config(method="inputs_only", iterations=8)
    (alone, alone_nerfs, _), (together, together_nerfs, _) = run_both(scenes[:2], models, config)
    for history_alone, history_together in zip(alone, together):
        assert "fusion" not in history_together.rows[-1]
        for row_alone, row_together in zip(history_alone.rows, history_together.rows):
            assert row_together == pytest.approx(row_alone, rel=1e-5, abs=1e-7)
    for nerf_alone, nerf_together in zip(alone_nerfs, together_nerfs):
        for name in nerf_alone:
            torch.testing.assert_close(nerf_together[name], nerf_alone[name], rtol=1e-3, atol=1e-4)


def test_scene_losses_batch_the_guidance_and_give_each_scene_its_own_loss(models):
    """scene_losses on two scenes' renders equals each scene's own DiffusionGuidance.loss, and draws as it does."""
    from sparsefusion.guidance import scene_losses

    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    features = torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(2))

    def guidances():
        return [DiffusionGuidance(models, 0.1, generator=torch.Generator().manual_seed(seed),
                                  device_generator=torch.Generator().manual_seed(seed + 100)) for seed in (57, 8)]

    together = scene_losses(guidances(), images, features, perceptual=True)
    alone = [guidance.loss(images[2 * s:2 * s + 2], features[2 * s:2 * s + 2]) for s, guidance in enumerate(guidances())]
    for terms_together, terms_alone in zip(together, alone):
        assert set(terms_together) == {"l1", "perceptual", "total"}
        for name in terms_alone:
            torch.testing.assert_close(terms_together[name], terms_alone[name], rtol=1e-5, atol=1e-7)


def test_scenes_whose_lockstep_settings_differ_are_refused(scenes, models):
    config = small_config(iterations=2)
    runs = [Distillation(models, scenes[0].cameras, scenes[0].images, scenes[0].masks, INPUTS, config),
            Distillation(models, scenes[1].cameras, scenes[1].images, scenes[1].masks, INPUTS,
                         replace(config, fusion_start=1))]
    with pytest.raises(ValueError, match="need the same DistillConfig.fusion_start"):
        MultiSceneDistillation(runs)
    # loss weights may differ (a scene without masks has its silhouette terms off)
    runs[1] = Distillation(models, scenes[1].cameras, scenes[1].images, scenes[1].masks, INPUTS,
                           replace(config, silhouette_weight=0.0))
    MultiSceneDistillation(runs)

"""The VAE stage: train an AutoencoderKL on the dataset's images (the mini models' first stage).

Upstream freezes Stable Diffusion's VAE. Models at other sizes train their own first, as latent
diffusion does (Rombach et al., CVPR 2022, Sec. 3.1 and App. G): a KL-regularised autoencoder whose
loss is the L1 reconstruction error summed over pixels plus kl_weight times the KL divergence of
q(z|x) from N(0, I) summed over latents, both averaged over the batch, and optionally LDM's perceptual
term: perceptual_weight times the image's LPIPS (VGG) distance added at every pixel (LDM's
LPIPSWithDiscriminator without its learned-variance and adversarial terms). Each step trains on the
views_per_scene images of one scene, the masked images (black background) that training and
distillation later encode. init_vae starts from given weights; vae_trains=decoder freezes the encoder
half (encoder, quant_conv) and trains the decoder alone, so the latents, and a VLDM trained on them,
stay valid: Stable Diffusion's ft-MSE VAE is such a fine-tuned decoder.

The checkpoint ckpt_{name}_vae.pt is a VAE file that load_vae reads as it is ('state_dict' in ldm
names and 'config'), plus 'scale_factor': 1 / the standard deviation of the latents of the first
scenes' images, as LDM's scale_by_std, so that the diffusion model sees latents of unit variance
(SD's 0.18215 plays that role for SD's VAE).
"""

import warnings

import torch
from torch import nn

from sparsefusion.external.autoencoder_kl import AutoencoderKL
from sparsefusion.checkpoint import config_to_dict, load_training_state
from sparsefusion.errors import UserError
from sparsefusion.losses import kl_to_standard_normal
from sparsefusion.outputs import image_grid
from sparsefusion.perceptual import build_lpips, lpips_distance, unavailable_message
from sparsefusion.vae import read_vae

SCALE_SCENES = 8  # scenes whose latents set the scale factor


class VAEModel(nn.Module):
    """An AutoencoderKL with LDM's loss: forward(images) returns {'total', 'reconstruction', 'kl', 'perceptual'}.

    lpips: a frozen LPIPS model, or None when perceptual_weight is 0.
    """

    def __init__(self, vae, kl_weight, perceptual_weight=0.0, lpips=None):
        super().__init__()
        self.vae = vae
        self.kl_weight, self.perceptual_weight = kl_weight, perceptual_weight
        self.lpips = [lpips]  # a list keeps the frozen network out of the module's parameters and state dict

    def forward(self, images):
        """Return the losses of images (B, 3, H, W) in [0, 1], reconstructed from a posterior sample.

        'total' is LDM's loss divided by the pixel count, so its scale reads like a mean L1 error;
        'reconstruction' is the mean L1 error in [−1, 1] units, 'kl' the mean KL per latent element,
        'perceptual' the mean LPIPS distance (0 without the term).
        """
        x = images * 2.0 - 1.0
        posterior = self.vae.encode(x)
        latents = posterior.sample()
        reconstruction = self.vae.decode(latents).float()
        l1 = (reconstruction - x).abs().flatten(1).sum(dim=1)  # (B,)
        kl = kl_to_standard_normal(posterior).float()           # (B,)
        pixels = x[0].numel()
        perceptual = torch.zeros_like(l1)
        if self.perceptual_weight > 0:
            perceptual = lpips_distance(self.lpips[0], images, (reconstruction + 1) / 2)
        total = (l1 + self.kl_weight * kl).mean() / pixels + self.perceptual_weight * perceptual.mean()
        return {"total": total, "reconstruction": l1.mean() / pixels, "kl": kl.mean() / latents[0].numel(),
                "perceptual": perceptual.mean(), "reconstructions": reconstruction.detach()}


def frozen_encoder(vae):
    """Freeze the encoder half of an AutoencoderKL (encoder, quant_conv) in place: its latents stay as they are."""
    for part in (vae.encoder, vae.quant_conv):
        part.requires_grad_(False)


@torch.no_grad()
def latent_scale_factor(vae, images, batch=32):
    """Return 1 / std of the posterior modes of images (N, 3, H, W) in [0, 1]: LDM's scale_by_std."""
    modes = torch.cat([vae.encode(part * 2.0 - 1.0).mode().float() for part in images.split(batch)])
    return float(1.0 / modes.flatten().std())


def perceptual_model(weight, device):
    """Return the frozen LPIPS(VGG) model the perceptual term needs, None for weight 0; UserError without weights."""
    if weight <= 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = build_lpips("vgg", device=device)
    if model is None:
        raise UserError(f"perceptual_weight={weight} needs LPIPS: {unavailable_message('vgg')}")
    return model.requires_grad_(False)


class VAEObjective:
    """What the Trainer needs of the VAE stage: the model, its optimizer, batches, checkpoints, pictures."""

    loss_names = ("total", "reconstruction", "kl", "perceptual")
    find_unused_parameters = False

    def __init__(self, config, device, dataset):
        """dataset: the training scenes (a SeededScenes); the first SCALE_SCENES set the latent scale factor."""
        self.config, self.device = config, device
        self.model = self.build_model(config, device).to(device).train()
        self.vae = self.model.vae
        if config.vae_trains == "decoder":
            frozen_encoder(self.vae)
        optimizer = torch.optim.Adam([p for p in self.vae.parameters() if p.requires_grad], lr=config.lr)
        self.optimizers = [optimizer]
        self.schedulers = [torch.optim.lr_scheduler.StepLR(optimizer, config.lr_step, config.lr_gamma)]
        scenes = [dataset[(0, index)] for index in range(min(len(dataset), SCALE_SCENES))]  # epoch 0's frames
        self.scale_images = torch.cat([scene.images for scene in scenes]).to(device)

    @staticmethod
    def build_model(config, device="cpu"):
        """Return the freshly initialised VAEModel of a TrainConfig (its LPIPS, if any, on device)."""
        return VAEModel(AutoencoderKL(config.autoencoder), config.kl_weight, config.perceptual_weight,
                        perceptual_model(config.perceptual_weight, device))

    def batch(self, scene):
        return scene.images.to(self.device)

    @staticmethod
    def checkpoint_files(exp_dir, name):
        """Return {'vae': path} of a checkpoint name ('latest' or a zero-padded step)."""
        return {"vae": exp_dir / f"ckpt_{name}_vae.pt"}

    def checkpoints(self, step):
        """Return {'vae': a VAE file load_vae reads, with the scale factor, optimizer and scheduler}."""
        self.vae.eval()
        scale = latent_scale_factor(self.vae, self.scale_images)
        self.vae.train()
        return {"vae": {"step": step, "state_dict": self.vae.state_dict(), "config": config_to_dict(self.vae.config),
                        "scale_factor": scale, "optimizer_state_dict": self.optimizers[0].state_dict(),
                        "scheduler_state_dict": self.schedulers[0].state_dict()}}

    def load(self, checkpoints, paths):
        """Load weights, optimizer and scheduler state from {'vae': checkpoint dict} (strict keys)."""
        load_training_state(self.vae, checkpoints["vae"], self.optimizers[0], self.schedulers[0],
                            f"VAE checkpoint {paths['vae']}", weights_key="state_dict")

    def load_initial_weights(self):
        """Load init_vae's weights (strictly) when given; otherwise keep the fresh initialisation (config.vae is not read)."""
        if self.config.init_vae:
            vae, _ = read_vae(self.config.init_vae, self.config.autoencoder)
            self.vae.load_state_dict(vae.state_dict())

    @torch.no_grad()
    def visualize(self, scene):
        """Return an (h, w, 3) image: four of the scene's images above their reconstructions (posterior mode)."""
        images = scene.images[:4].to(self.device)
        self.vae.eval()
        reconstructions = ((self.vae.decode(self.vae.encode(images * 2 - 1).mode()) + 1) / 2).clamp(0, 1)
        self.vae.train()
        panels = torch.cat([images, reconstructions]).permute(0, 2, 3, 1).float().cpu().numpy()
        return image_grid(list(panels), per_row=len(images))

"""Stable Diffusion v1's first stage: the KL-regularised autoencoder of latent diffusion, under CompVis ldm's names.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022, Sec. 3 and App. G.
The encoder and decoder are DDPM's UNet halves without time embedding or skips; the defaults are upstream's
external/ldm/configs/sd-vae.yaml, so SD v1 checkpoints load by name (see docs/vae.md).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AutoencoderKLConfig:
    """SD v1's VAE by default: (B, 3, 256, 256) images <-> (B, 4, 32, 32) latents, 83.65 M parameters."""

    in_channels: int = 3             # image channels into the encoder
    out_ch: int = 3                  # image channels out of the decoder
    ch: int = 128                    # base width: level i has ch * ch_mult[i] channels
    ch_mult: tuple = (1, 2, 4, 4)    # width multiplier per level; every level but the last halves H and W
    num_res_blocks: int = 2          # ResnetBlocks per encoder level (decoder levels have one more)
    z_channels: int = 4              # channels of the latent the decoder reads
    double_z: bool = True            # the encoder predicts mean and log-variance (the KL posterior needs it)
    embed_dim: int = 4               # latent channels between quant_conv and post_quant_conv
    dropout: float = 0.0             # dropout inside every ResnetBlock
    norm_groups: int = 32            # GroupNorm groups; ldm fixes 32, small test models need fewer


def group_norm(channels, groups):
    """Return ldm's normalisation layer: GroupNorm with eps 1e-6 and an affine transform."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: GroupNorm, SiLU, 3x3 conv, twice; a 1x1 conv shortcut where widths differ."""

    def __init__(self, in_channels, out_channels, dropout, groups):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x):
        """Return (B, C_out, H, W) from x (B, C_in, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, 1x1 convs for q, k, v and the output, residual."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x):
        """Return x + attention(x), (B, C, H, W); the softmax is scaled by C^-1/2 as in ldm."""
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row and column at the bottom and right, as ldm does."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        """Return (B, C, H/2, W/2) from x (B, C, H, W)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        """Return (B, C, 2H, 2W) from x (B, C, H, W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution: the only attention in SD's VAE."""

    def __init__(self, channels, dropout, groups):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x):
        """Return (B, C, H, W)."""
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Module):
    """One encoder resolution: ResnetBlocks, then a Downsample unless it is the last level."""

    def __init__(self, in_channels, out_channels, num_blocks, downsample, dropout, groups):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, dropout, groups) for a, b in zip(widths[:-1], widths[1:]))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x):
        """Return (B, C_out, H', W') with H' = H/2 if this level downsamples, else H."""
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(nn.Module):
    """One decoder resolution: ResnetBlocks, then an Upsample unless it is full resolution (level 0)."""

    def __init__(self, in_channels, out_channels, num_blocks, upsample, dropout, groups):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, dropout, groups) for a, b in zip(widths[:-1], widths[1:]))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x):
        """Return (B, C_out, H', W') with H' = 2H if this level upsamples, else H."""
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> posterior moments (B, 2*z_channels, H/f, W/f), f = 2^(levels-1)."""

    def __init__(self, config):
        super().__init__()
        c, widths, levels = config, [config.ch * m for m in config.ch_mult], len(config.ch_mult)
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList(
            EncoderLevel(([c.ch] + widths)[i], widths[i], c.num_res_blocks, i < levels - 1, c.dropout, c.norm_groups)
            for i in range(levels)
        )
        self.mid = MidBlock(widths[-1], c.dropout, c.norm_groups)
        self.norm_out = group_norm(widths[-1], c.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.z_channels if c.double_z else c.z_channels, 3, padding=1)

    def forward(self, x):
        """Return the moments (B, 2*z_channels, H/f, W/f) (z_channels without double_z)."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f); up[i] is level i, up[-1] runs first."""

    def __init__(self, config):
        super().__init__()
        c, widths, levels = config, [config.ch * m for m in config.ch_mult], len(config.ch_mult)
        self.conv_in = nn.Conv2d(c.z_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = MidBlock(widths[-1], c.dropout, c.norm_groups)
        # Level i reads what level i+1 (run before it) wrote; the lowest level reads the mid block's output.
        self.up = nn.ModuleList(
            DecoderLevel(widths[min(i + 1, levels - 1)], widths[i], c.num_res_blocks + 1, i > 0, c.dropout,
                         c.norm_groups)
            for i in range(levels)
        )
        self.norm_out = group_norm(widths[0], c.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], c.out_ch, kernel_size=3, padding=1)

    def forward(self, z):
        """Return the image (B, out_ch, h*f, w*f), unbounded (about [-1, 1] when trained)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))), logvar clamped to [-30, 20] as in ldm."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        """Return mean + std * eps, eps ~ N(0, I), (B, C, h, w)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self):
        """Return the mean, (B, C, h, w): what SD and SparseFusion feed to diffusion."""
        return self.mean


class AutoencoderKL(nn.Module):
    """ldm's AutoencoderKL: encode(images in [-1, 1]) -> posterior over latents, decode(latents) -> images."""

    def __init__(self, config=None):
        super().__init__()
        config = config or AutoencoderKLConfig()
        if not config.double_z:
            raise ValueError("AutoencoderKL needs double_z=True: its posterior takes a mean and a log-variance")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    @property
    def downsampling_factor(self):
        """Return f: images of H x W have latents of H/f x W/f (8 for SD)."""
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, x):
        """Return the posterior over latents (B, embed_dim, H/f, W/f) of images x (B, 3, H, W) in [-1, 1]."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """Return images (B, 3, h*f, w*f), about [-1, 1], from unscaled latents z (B, embed_dim, h, w)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True, generator=None):
        """Return (reconstruction (B, 3, H, W), posterior) of x in [-1, 1], decoding a sample or the mode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

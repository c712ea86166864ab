"""Imagen's efficient UNet (Saharia et al. 2022), in the configuration SparseFusion trains.

The denoiser of the view-conditioned latent diffusion model: it maps a noised SD latent z_t
(B, 4, 32, 32), the cosine schedule's log-SNR λ (B,) and the EFT feature map (B, 256, 32, 32),
concatenated to z_t as input channels, to the predicted noise ε̂ (B, 4, 32, 32).

Module and parameter names are those of upstream's external/imagen_pytorch.Unet (itself from
lucidrains' imagen-pytorch), so the released ckpt_latest.pt loads strictly. Only the code paths of
SparseFusion's configuration exist: no text conditioning, no cascade, no linear attention, no
memory-efficient variant. Layout, for dims = (256, 256, 512, 1024, 1024) and a 32×32 input:

    init_conv        same-size convolutions with kernels 3, 7, 15, concatenated → 256 channels
    time             λ → learned Fourier features → t (B, 1024) for the resnet blocks, and two
                     normalised time tokens c (B, 2, 256) for the attention layers
    downs[i]         [None, resnet block, GlobalContext resnet blocks ×2, transformer | Identity,
                     4×4 stride-2 conv (last stage: 3×3 + 1×1 conv, no downsampling)]
    middle (4×4)     resnet block with cross-attention to c, self-attention, the same again
    ups[i]           [resnet block, GlobalContext resnet blocks ×2, transformer | Identity,
                     pixel-shuffle ×2 | Identity]; every resnet block takes the matching down-path
                     output (scaled by 2^-1/2) concatenated to its input
    final_res_block, final_conv (zero-initialised: a fresh model predicts ε̂ = 0)
"""

import math
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from sparsefusion.config import check_choice

ATTENTION_BACKENDS = ("sdpa", "math")


@dataclass
class UnetConfig:
    """The UNet's hyper-parameters; the defaults are upstream's utils/load_model.py configuration."""

    channels: int = 4                                  # latent channels, in and out
    dim: int = 256                                     # base width; also the width of the time tokens
    dim_mults: tuple = (1, 2, 4, 4)                    # stage i works at dim * dim_mults[i] channels (first must be 1)
    num_resnet_blocks: tuple = (2, 2, 2, 2)            # GlobalContext resnet blocks per stage, after its first block
    layer_attns: tuple = (False, False, False, True)   # whether stage i has a self-attention transformer block
    cond_images_channels: int = 256                    # EFT feature channels concatenated to the input; 0 = none
    attn_heads: int = 8                                # query heads of every attention layer
    attn_dim_head: int = 64                            # width of one attention head
    ff_mult: float = 2.0                               # transformer feed-forward width / stage width
    resnet_groups: int = 8                             # GroupNorm groups in the resnet blocks
    num_time_tokens: int = 2                           # time tokens the attention layers attend to
    learned_sinu_pos_emb_dim: int = 16                 # learned Fourier features of the log-SNR (2 per frequency)
    init_cross_embed_kernel_sizes: tuple = (3, 7, 15)  # kernel sizes of the first, same-size convolutions
    max_conditional_len: int = 256                     # rows of the stored, unused null text embedding
    attention: str = "sdpa"                            # "sdpa" (F.scaled_dot_product_attention) or "math" (reference)

    @classmethod
    def small(cls, **overrides):
        """Return a tiny configuration (two stages of width 16 and 32) for tests and CPU runs."""
        tiny = dict(channels=4, dim=16, dim_mults=(1, 2), num_resnet_blocks=(1, 1), layer_attns=(False, True),
                    cond_images_channels=3, attn_heads=2, attn_dim_head=8, resnet_groups=4, max_conditional_len=4)
        return replace(cls(**tiny), **overrides)


# ----------------------------------------------------------------------------------------------
# Normalisations and small wrappers


class LayerNorm(nn.Module):
    """Return x normalised over its last dimension and scaled by g (no bias)."""

    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Upstream uses eps 1e-3 for half-precision inputs; F.layer_norm runs in fp32 under autocast,
        # so 1e-5 (upstream's fp32 value) keeps bf16 results closest to fp32.
        return F.layer_norm(x, x.shape[-1:], self.g, eps=1e-5)


class ChanLayerNorm(nn.Module):
    """Return a feature map (B, C, H, W) normalised over its channels at every pixel, scaled by g."""

    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        normed = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.g.flatten(), eps=1e-5)
        return normed.permute(0, 3, 1, 2)


class Identity(nn.Module):
    """Return x unchanged, ignoring conditioning arguments (a stage without a transformer block)."""

    def forward(self, x, *args, **kwargs):
        return x


class Residual(nn.Module):
    """Return fn(x) + x."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(x, **kwargs) + x


class OnTokens(nn.Module):
    """Return fn applied to a feature map (B, C, H, W) read as tokens (B, H·W, C), as a map again."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, **kwargs):
        b, c, h, w = x.shape
        out = self.fn(x.permute(0, 2, 3, 1).reshape(b, h * w, c), **kwargs)  # (B, HW, C)
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Parallel(nn.Module):
    """Return the sum of fns applied to x."""

    def __init__(self, *fns):
        super().__init__()
        self.fns = nn.ModuleList(fns)

    def forward(self, x):
        return sum(fn(x) for fn in self.fns)


# ----------------------------------------------------------------------------------------------
# Attention


def attend(q, k, v, backend):
    """Return softmax(q kᵀ / √d) v, (B, h, N, d), for q (B, h, N, d) and k, v (B, h or 1, M, d)."""
    if backend == "sdpa":
        expanded = (q.shape[0], q.shape[1], -1, -1)
        return F.scaled_dot_product_attention(q, k.expand(expanded), v.expand(expanded))
    sim = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, h, N, M)
    return sim.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-query self-attention over tokens (B, N, dim).

    All query heads share one key/value head; the keys/values are the tokens', a learned null pair,
    and, given context tokens (B, T, context_dim), a projection of those (the time tokens).
    """

    def __init__(self, dim, heads, dim_head, context_dim=None, backend="sdpa"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.norm = LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_context = (nn.Sequential(nn.LayerNorm(context_dim), nn.Linear(context_dim, 2 * dim_head))
                           if context_dim else None)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), LayerNorm(dim))

    def forward(self, x, context=None):
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, h, N, d)
        kv = self.to_kv(x)                                           # (B, N, 2d): key | value
        pairs = [self.null_kv.to(kv.dtype).reshape(1, 1, -1).expand(b, 1, -1), kv]
        if context is not None:
            pairs.insert(0, self.to_context(context).to(kv.dtype))
        k, v = torch.cat(pairs, dim=1).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, M, d) each
        out = attend(q, k, v, self.backend).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class CrossAttention(nn.Module):
    """Multi-head attention from tokens (B, N, dim) to context tokens (B, T, context_dim) and a learned null pair."""

    def __init__(self, dim, context_dim, heads, dim_head, backend="sdpa"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.norm = LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), LayerNorm(dim))

    def forward(self, x, context):
        b, n, _ = x.shape
        t = context.shape[1]
        q = self.to_q(self.norm(x)).view(b, n, self.heads, -1).transpose(1, 2)      # (B, h, N, d)
        k, v = self.to_kv(context).view(b, t, 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, T, d) each
        null_k, null_v = self.null_kv.to(k.dtype)[:, None, None, None, :].expand(2, b, self.heads, 1, -1)
        k, v = torch.cat((null_k, k), dim=2), torch.cat((null_v, v), dim=2)         # (B, h, T+1, d)
        out = attend(q, k, v, self.backend).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


def chan_feed_forward(dim, mult):
    """Return the transformer's feed-forward on feature maps: norm, 1×1 conv, GELU, norm, 1×1 conv."""
    hidden = int(dim * mult)
    return nn.Sequential(ChanLayerNorm(dim), nn.Conv2d(dim, hidden, 1, bias=False), nn.GELU(),
                         ChanLayerNorm(hidden), nn.Conv2d(hidden, dim, 1, bias=False))


class TransformerBlock(nn.Module):
    """Return a feature map (B, dim, H, W) after one pre-norm layer: self-attention (with context), feed-forward."""

    def __init__(self, dim, heads, dim_head, ff_mult, context_dim, backend="sdpa"):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([
            OnTokens(Attention(dim, heads, dim_head, context_dim, backend)),
            chan_feed_forward(dim, ff_mult),
        ])])

    def forward(self, x, context=None):
        for attn, ff in self.layers:
            x = attn(x, context=context) + x
            x = ff(x) + x
        return x


# ----------------------------------------------------------------------------------------------
# Convolutional blocks


class Block(nn.Module):
    """Return conv3×3(SiLU(GroupNorm(x) · (1 + scale) + shift)), (B, dim_out, H, W)."""

    def __init__(self, dim, dim_out, groups):
        super().__init__()
        self.groupnorm = nn.GroupNorm(groups, dim)
        self.activation = nn.SiLU()
        self.project = nn.Conv2d(dim, dim_out, 3, padding=1)

    def forward(self, x, scale=None, shift=None):
        x = self.groupnorm(x)
        if scale is not None:
            x = x * (scale + 1) + shift
        return self.project(self.activation(x))


class GlobalContext(nn.Module):
    """Return channel gates (B, dim_out, 1, 1) in (0, 1) from attention-pooled features (GCNet, Cao et al. 2019)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        hidden = max(3, dim_out // 2)
        self.to_k = nn.Conv2d(dim_in, 1, 1)
        self.net = nn.Sequential(nn.Conv2d(dim_in, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, dim_out, 1), nn.Sigmoid())

    def forward(self, x):
        weights = self.to_k(x).flatten(2).softmax(dim=-1).view_as(x[:, :1])  # (B, 1, H, W), sums to 1
        return self.net((x * weights).sum(dim=(2, 3), keepdim=True))


class ResnetBlock(nn.Module):
    """Return block2(block1(x) [+ cross-attention to c], FiLM by t) [· gates] + skip(x), (B, dim_out, H, W)."""

    def __init__(self, dim, dim_out, time_cond_dim, groups, cond_dim=None, use_gca=False, heads=8, dim_head=64,
                 backend="sdpa"):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_cond_dim, dim_out * 2))
        self.cross_attn = (OnTokens(CrossAttention(dim_out, cond_dim, heads, dim_head, backend))
                           if cond_dim else None)
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.gca = GlobalContext(dim_out, dim_out) if use_gca else None
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, t, c=None):
        scale, shift = self.time_mlp(t)[:, :, None, None].chunk(2, dim=1)  # (B, dim_out, 1, 1) each
        h = self.block1(x)
        if self.cross_attn is not None:
            h = self.cross_attn(h, context=c) + h
        h = self.block2(h, scale, shift)
        if self.gca is not None:
            h = h * self.gca(h)
        return h + self.res_conv(x)


class CrossEmbedLayer(nn.Module):
    """Return the concatenated outputs (B, dim_out, H, W) of same-size convolutions with several kernel sizes."""

    def __init__(self, dim_in, dim_out, kernel_sizes):
        super().__init__()
        kernel_sizes = sorted(kernel_sizes)
        widths = [dim_out // 2 ** i for i in range(1, len(kernel_sizes))]
        widths.append(dim_out - sum(widths))
        self.convs = nn.ModuleList([nn.Conv2d(dim_in, width, k, padding=(k - 1) // 2)
                                    for k, width in zip(kernel_sizes, widths)])

    def forward(self, x):
        return torch.cat([conv(x) for conv in self.convs], dim=1)


class PixelShuffleUpsample(nn.Module):
    """Return x upsampled ×2 (B, dim_out, 2H, 2W) by a 1×1 conv, SiLU and pixel shuffle.

    The conv is initialised with each output filter repeated for its 4 sub-pixels, so that a fresh
    layer upsamples like nearest neighbour (ICNR; Aitken et al. 2017).
    """

    def __init__(self, dim, dim_out):
        super().__init__()
        conv = nn.Conv2d(dim, dim_out * 4, 1)
        self.net = nn.Sequential(conv, nn.SiLU(), nn.PixelShuffle(2))
        weight = torch.empty(dim_out, dim, 1, 1)
        nn.init.kaiming_uniform_(weight)
        with torch.no_grad():
            conv.weight.copy_(weight.repeat_interleave(4, dim=0))
            conv.bias.zero_()

    def forward(self, x):
        return self.net(x)


class LearnedSinusoidalPosEmb(nn.Module):
    """Return [λ, sin(2π w λ), cos(2π w λ)], (B, dim + 1), for λ (B,) and learned frequencies w (dim/2,)."""

    def __init__(self, dim):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, x):
        x = x[:, None]
        freqs = x * self.weights * 2 * math.pi
        return torch.cat((x, freqs.sin(), freqs.cos()), dim=-1)


# ----------------------------------------------------------------------------------------------
# The UNet


class Unet(nn.Module):
    """Imagen's UNet as SparseFusion configures it: ε̂ = unet(z_t, λ, EFT features)."""

    def __init__(self, config=None):
        super().__init__()
        cfg = self.config = config or UnetConfig()
        n_stages = len(cfg.dim_mults)
        check_choice("attention", cfg.attention, ATTENTION_BACKENDS)
        if not (len(cfg.num_resnet_blocks) == len(cfg.layer_attns) == n_stages) or cfg.dim_mults[0] != 1:
            raise ValueError("num_resnet_blocks and layer_attns need one entry per stage, and dim_mults[0] must be 1")
        dim, time_cond_dim = cfg.dim, 4 * cfg.dim
        heads = dict(heads=cfg.attn_heads, dim_head=cfg.attn_dim_head, backend=cfg.attention)
        resnet = partial(ResnetBlock, time_cond_dim=time_cond_dim, groups=cfg.resnet_groups, **heads)

        def transformer(width):
            return TransformerBlock(width, ff_mult=cfg.ff_mult, context_dim=dim, **heads)

        # Upstream's text-conditioning null embeddings: stored in the checkpoint, never used here.
        self.null_conditional_embed = nn.Parameter(torch.randn(1, cfg.max_conditional_len, dim))
        self.null_conditional_hidden = nn.Parameter(torch.randn(1, time_cond_dim))

        self.init_conv = CrossEmbedLayer(cfg.channels + cfg.cond_images_channels, dim,
                                         cfg.init_cross_embed_kernel_sizes)
        self.to_time_hiddens = nn.Sequential(LearnedSinusoidalPosEmb(cfg.learned_sinu_pos_emb_dim),
                                             nn.Linear(cfg.learned_sinu_pos_emb_dim + 1, time_cond_dim), nn.SiLU())
        self.to_time_cond = nn.Sequential(nn.Linear(time_cond_dim, time_cond_dim))
        self.to_time_tokens = nn.Sequential(nn.Linear(time_cond_dim, dim * cfg.num_time_tokens),
                                            nn.Unflatten(1, (cfg.num_time_tokens, dim)))
        self.norm_cond = nn.LayerNorm(dim)

        dims = [dim] + [dim * m for m in cfg.dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            is_last = i == n_stages - 1
            self.downs.append(nn.ModuleList([
                None,  # upstream's pre-downsample slot (memory-efficient UNets only), kept for its key numbering
                resnet(d_in, d_in),
                nn.ModuleList([resnet(d_in, d_in, use_gca=True) for _ in range(cfg.num_resnet_blocks[i])]),
                transformer(d_in) if cfg.layer_attns[i] else Identity(),
                (Parallel(nn.Conv2d(d_in, d_out, 3, padding=1), nn.Conv2d(d_in, d_out, 1)) if is_last
                 else nn.Conv2d(d_in, d_out, 4, stride=2, padding=1)),
            ]))

        mid = dims[-1]
        self.mid_block1 = resnet(mid, mid, cond_dim=dim)
        self.mid_attn = OnTokens(Residual(Attention(mid, cfg.attn_heads, cfg.attn_dim_head, backend=cfg.attention)))
        self.mid_block2 = resnet(mid, mid, cond_dim=dim)

        for i, (d_in, d_out) in reversed(list(enumerate(in_out))):
            self.ups.append(nn.ModuleList([
                resnet(d_out + d_in, d_out),
                nn.ModuleList([resnet(d_out + d_in, d_out, use_gca=True) for _ in range(cfg.num_resnet_blocks[i])]),
                transformer(d_out) if cfg.layer_attns[i] else Identity(),
                PixelShuffleUpsample(d_out, d_in) if i > 0 else Identity(),
            ]))

        self.final_res_block = resnet(dim, dim, use_gca=True)
        self.final_conv = nn.Conv2d(dim, cfg.channels, 3, padding=1)
        nn.init.zeros_(self.final_conv.weight)
        nn.init.zeros_(self.final_conv.bias)
        self.skip_connect_scale = 2 ** -0.5

    def forward(self, x, log_snr, cond_images=None):
        """Return ε̂ (B, channels, H, W).

        Args:
            x: noised latents z_t (B, channels, H, W), H and W divisible by 2^(stages-1).
            log_snr: the noise level as log-SNR λ (B,), the time input of upstream's UNet.
            cond_images: EFT features (B, cond_images_channels, H, W), concatenated before x.
        """
        if self.config.cond_images_channels:
            x = torch.cat((cond_images, x), dim=1)
        x = self.init_conv(x)

        time_hiddens = self.to_time_hiddens(log_snr)             # (B, 4·dim)
        c = self.norm_cond(self.to_time_tokens(time_hiddens))    # (B, tokens, dim)
        t = self.to_time_cond(time_hiddens)                      # (B, 4·dim)

        hiddens = []
        for _, init_block, blocks, attn, downsample in self.downs:
            x = init_block(x, t)
            for block in blocks:
                x = block(x, t)
                hiddens.append(x)
            x = attn(x, c)
            hiddens.append(x)
            x = downsample(x)

        x = self.mid_block1(x, t, c)
        x = self.mid_attn(x)
        x = self.mid_block2(x, t, c)

        for init_block, blocks, attn, upsample in self.ups:
            x = init_block(torch.cat((x, hiddens.pop() * self.skip_connect_scale), dim=1), t)
            for block in blocks:
                x = block(torch.cat((x, hiddens.pop() * self.skip_connect_scale), dim=1), t)
            x = attn(x, c)
            x = upsample(x)

        return self.final_conv(self.final_res_block(x, t))

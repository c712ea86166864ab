"""The epipolar feature transformer (EFT) of SparseFusion (Zhou & Tulsiani, CVPR 2023, Sec. 3.2).

For every query ray, points between a near and a far depth are projected into each context view and
the context views' ResNet-18 features and colours are read there. Three transformers aggregate them,
following Suhail et al.'s generalizable patch-based neural rendering (ECCV 2022):
  T1 attends over the context views of each point,
  T2 over the points of each ray and view, pooled with softmax weights,
  T3 over the views of each ray, pooled with softmax weights.
The result is a feature per ray (the VLDM's conditioning) and a colour from a linear head.

Module and parameter names are upstream's, so its released `ckpt_latest_eft.pt` loads strictly.

Dimension letters: B query cameras, N rays per camera, P points per ray, V context views, C channels.
"""

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsefusion.checkpoint import load_file, load_state_dict_strict, model_checkpoint, save_atomic, stored_config
from sparsefusion.config import check_choice
from sparsefusion.errors import UserError
from sparsefusion.rays import HarmonicEmbedding

RESNET18_IMAGENET_FILE = "resnet18-f37072fd.pth"  # torchvision's IMAGENET1K_V1 weights, as upstream's pretrained=True
RESNET18_STAGES = ("layer1", "layer2", "layer3")  # stages after the stem whose outputs are features
BACKBONES = ("resnet18", "small")


@dataclass
class EFTConfig:
    n_harmonic_functions: int = 6    # frequencies of the harmonic embedding of rays and depths
    omega0: float = 1.0              # base frequency of that embedding
    hidden_dim: int = 256            # width of T1, T2, T3 and of the output feature
    n_layers: int = 4                # transformer layers in each of T1, T2, T3
    dropout: float = 0.1             # dropout inside the transformer layers
    backbone: str = "resnet18"       # "resnet18": torchvision's, layer4 and fc kept unused (upstream); "small": a
                                     # ResNet of BasicBlocks with backbone_widths / backbone_blocks, no layer4/fc
    backbone_widths: tuple = (32, 64, 128)  # "small": channels of layer1-3 (the stem has layer1's)
    backbone_blocks: tuple = (1, 1, 1)      # "small": BasicBlocks in layer1-3
    backbone_weights: str = "auto"   # resnet18 only: "auto": ImageNet ResNet-18 from the torch hub cache when
                                     # there, else random with a warning; "random"; or a path to resnet18-f37072fd.pth


@dataclass
class ContextViews:
    """Context images and their backbone features, computed once and read by every query ray."""

    images: torch.Tensor    # (V, 3, H, W) in [0, 1]
    latents: torch.Tensor   # (V, 512, H/2, W/2) ResNet-18 stem and layer1-3 outputs, upsampled and stacked


@dataclass
class EFTOutput:
    """Per-ray outputs of the EFT; ... is the ray layout of the query bundle, e.g. (H, W)."""

    rgb: torch.Tensor         # (B, ..., 3) colour head output in [0, 1] (the "EFT image")
    features: torch.Tensor    # (B, ..., C) pooled T3 features (the VLDM's conditioning)
    coarse_rgb: torch.Tensor  # (B, ..., 3) context colours averaged with the T2 and T3 weights, in [0, 1]

    def packed(self):
        """Return (B, ..., 3 + C): colour then features, the layout of upstream's feature renderer."""
        return torch.cat([self.rgb, self.features], dim=-1)


def resnet18_cache_path():
    """Return where torchvision keeps the ImageNet ResNet-18 weights: <torch hub dir>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_IMAGENET_FILE


def load_backbone_weights(backbone, weights):
    """Load ImageNet weights into a torchvision ResNet-18 as `weights` says; return whether it did.

    weights: "auto" (the torch hub cache if the file is there, otherwise keep the random init and
    warn in one line), "random", or a path (which must exist).
    """
    if weights == "random":
        return False
    path = resnet18_cache_path() if weights == "auto" else Path(weights)
    if weights == "auto" and not path.is_file():
        warnings.warn(f"EFT backbone: no ImageNet ResNet-18 at {path}; using random init "
                      f"(fine when an EFT checkpoint is loaded next)", stacklevel=3)
        return False
    state = load_file(path, "ImageNet ResNet-18 weights", where_to_get="torchvision's resnet18 IMAGENET1K_V1")
    load_state_dict_strict(backbone, state, f"ResNet-18 weights at {path}")
    return True


class SmallResNet(nn.Module):
    """A ResNet stem and three stages of torchvision BasicBlocks at chosen widths, under ResNet-18's names.

    The EFT reads the stem and layer1-3 (see EpipolarFeatureTransformer.encode); this backbone has only
    those, so small models need neither ResNet-18's 11 M parameters nor ImageNet weights.
    """

    def __init__(self, widths=(32, 64, 128), blocks=(1, 1, 1)):
        from torchvision.models.resnet import BasicBlock  # torchvision imports in seconds: not for --help

        super().__init__()
        if len(widths) != 3 or len(blocks) != 3 or min(blocks) < 1:
            raise ValueError(f"backbone_widths and backbone_blocks need 3 entries (blocks >= 1), got {widths}, {blocks}")
        stem = widths[0]
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = stem
        for index, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if index == 0 else 2
            layers = [BasicBlock(channels, width, stride, downsample=_projection(channels, width, stride))]
            layers += [BasicBlock(width, width) for _ in range(count - 1)]
            setattr(self, RESNET18_STAGES[index], nn.Sequential(*layers))
            channels = width


def _projection(channels, width, stride):
    """Return torchvision's 1×1 conv + BatchNorm shortcut where a block changes width or stride, else None."""
    if stride == 1 and channels == width:
        return None
    return nn.Sequential(nn.Conv2d(channels, width, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(width))


def build_backbone(config):
    """Return the EFT's image encoder for an EFTConfig (see its backbone fields)."""
    check_choice("eft.backbone", config.backbone, BACKBONES, UserError)
    if config.backbone == "small":
        return SmallResNet(tuple(config.backbone_widths), tuple(config.backbone_blocks))
    import torchvision  # imports in seconds: not for --help

    backbone = torchvision.models.resnet18(weights=None)
    load_backbone_weights(backbone, config.backbone_weights)
    return backbone


def plucker_coordinates(origins, directions):
    """Return Plücker coordinates (..., 6) = (d, o × d) of rays with origins o and directions (normalised) d."""
    directions = F.normalize(directions, dim=-1)
    return torch.cat([directions, torch.cross(origins, directions, dim=-1)], dim=-1)


def sample_views(maps, xy_ndc):
    """Return maps (V, C, H, W) read bilinearly at NDC points xy_ndc (V, M, 2), as (V, M, C).

    As upstream: grid_sample at -xy (NDC +x/+y point left/up, grid_sample's -1 is the left/top) with
    align_corners=True, so NDC ±1 lands on the centres of the outer pixels, and border padding.
    """
    sampled = F.grid_sample(maps, -xy_ndc[:, :, None, :], mode="bilinear", padding_mode="border",
                            align_corners=True)  # (V, C, M, 1)
    return sampled[..., 0].transpose(1, 2)


def softmax_pool(values, logits, dim):
    """Return (sum over dim of values · softmax(logits), the weights): attention pooling along dim."""
    weights = torch.softmax(logits, dim=dim)
    return (values * weights).sum(dim), weights


MAX_CUDA_ATTENTION_BATCH = 65535


class TransformerEncoder(nn.Module):
    """A linear+GELU input projection, then post-norm self-attention layers (one head) over dim 1."""

    def __init__(self, in_dim, hidden_dim, n_layers, dropout):
        super().__init__()
        self.pre = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU())
        layer = nn.TransformerEncoderLayer(hidden_dim, nhead=1, dim_feedforward=hidden_dim, dropout=dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)

    def forward(self, x):
        """Return (S, L, hidden) for x (S, L, in): S independent sequences of length L."""
        h = self.pre(x)
        if not h.is_cuda or h.shape[0] <= MAX_CUDA_ATTENTION_BATCH:
            return self.encoder(h)
        # CUDA's memory-efficient attention refuses more than 65535 sequences when dropout is on
        return torch.cat([self.encoder(part) for part in h.split(MAX_CUDA_ATTENTION_BATCH)])


class EpipolarFeatureTransformer(nn.Module):
    """SparseFusion's EFT with upstream's demo/train configuration (use_r=True, ResNet-18, features out)."""

    def __init__(self, config=None):
        super().__init__()
        config = config or EFTConfig()
        self.config = config
        hidden = config.hidden_dim
        self.harmonic_embedding = HarmonicEmbedding(config.n_harmonic_functions, config.omega0)
        self.encoder_model = build_backbone(config)
        # Upstream runs one encode of a zero image in training mode here (to read the feature width),
        # which moves the stem's and layer1-3's BatchNorm running statistics one momentum step.
        # Kept, so a freshly built model's state dict equals upstream's; a loaded checkpoint overwrites it.
        with torch.no_grad():
            self.encode(torch.zeros(1, 3, 224, 224))

        ray_dim = self.harmonic_embedding.output_dim(6)
        depth_dim = self.harmonic_embedding.output_dim(1)
        patch_dim = self.latent_dim + 3
        self.t1 = TransformerEncoder(ray_dim + depth_dim + patch_dim, hidden, config.n_layers, config.dropout)
        self.t2 = TransformerEncoder(2 * ray_dim + depth_dim + hidden, hidden, config.n_layers, config.dropout)
        self.t2_attn = nn.Linear(hidden, 1)
        self.t3 = TransformerEncoder(2 * ray_dim + hidden, hidden, config.n_layers, config.dropout)
        self.t3_attn = nn.Linear(hidden, 1)
        self.color_layer = nn.Sequential(nn.Linear(hidden, 3), nn.Sigmoid())

    @property
    def latent_dim(self):
        """Channels of the stacked backbone features: the stem's (64 for ResNet-18) plus layer1-3's."""
        return self.encoder_model.conv1.out_channels + sum(getattr(self.encoder_model, name)[-1].conv2.out_channels for name in RESNET18_STAGES)

    def encode(self, images):
        """Return the ContextViews of images (V, 3, H, W) in [0, 1].

        The stem (conv1, bn1, relu) and layer1-3 outputs are upsampled bilinearly (align_corners=True)
        to the stem's resolution H/2 × W/2 and stacked: (V, 64 + 64 + 128 + 256, H/2, W/2) for ResNet-18. As upstream,
        the images enter the ResNet unnormalised and layer4/fc are never used.
        """
        net = self.encoder_model
        x = net.relu(net.bn1(net.conv1(images)))
        stages = [x]
        x = net.maxpool(x)
        for name in RESNET18_STAGES:
            x = getattr(net, name)(x)
            stages.append(x)
        size = stages[0].shape[-2:]
        stages = [stages[0]] + [F.interpolate(s, size, mode="bilinear", align_corners=True) for s in stages[1:]]
        return ContextViews(images=images, latents=torch.cat(stages, dim=1))

    def forward(self, rays, context_cameras, context):
        """Return the EFTOutput of rays (B, ..., P) of B query cameras, given V context views.

        Args:
            rays: a RayBundle; points are origins + lengths · directions (directions need not be unit).
            context_cameras: the V context cameras in the frame of the rays, or B·V cameras (query-major:
                the V cameras of query 0, then of query 1, ...) when each query has its own frame.
            context: ContextViews of the V context images (from encode).
        """
        layout = rays.origins.shape[:-1]
        n_points = rays.lengths.shape[-1]
        query, depths, reference, patches = self.ray_inputs(rays, context_cameras, context)
        n_views = patches.shape[3]

        # T1: per point, attention over the context views
        t1_in = torch.cat([reference, depths[:, :, :, None].expand(-1, -1, -1, n_views, -1), patches], dim=-1)
        f1 = self.t1(t1_in.flatten(0, 2)).unflatten(0, t1_in.shape[:3])  # (B, N, P, V, C)

        # T2: per ray and view, attention over the points, pooled with softmax weights over P
        per_view = lambda x: x.expand(-1, -1, n_points, n_views, -1).transpose(2, 3)  # (B, N, V, P, ·)
        t2_in = torch.cat([per_view(query[:, :, :, None]), per_view(reference), per_view(depths[:, :, :, None]),
                           per_view(f1)], dim=-1)
        f2 = self.t2(t2_in.flatten(0, 2)).unflatten(0, t2_in.shape[:3])  # (B, N, V, P, C)
        f2, t2_weights = softmax_pool(f2, self.t2_attn(f2), dim=3)  # (B, N, V, C), (B, N, V, P, 1)

        # T3: per ray, attention over the views (reference rays of the middle point), pooled over V
        t3_in = torch.cat([query.expand(-1, -1, n_views, -1), reference[:, :, n_points // 2], f2], dim=-1)
        f3 = self.t3(t3_in.flatten(0, 1)).unflatten(0, t3_in.shape[:2])  # (B, N, V, C)
        features, t3_weights = softmax_pool(f3, self.t3_attn(f3), dim=2)  # (B, N, C), (B, N, V, 1)

        context_rgb = patches[..., -3:].transpose(2, 3)  # (B, N, V, P, 3)
        coarse_rgb = ((context_rgb * t2_weights).sum(3) * t3_weights).sum(2).clamp(0.0, 1.0)
        return EFTOutput(
            rgb=self.color_layer(features).reshape(*layout, 3),
            features=features.reshape(*layout, features.shape[-1]),
            coarse_rgb=coarse_rgb.reshape(*layout, 3),
        )

    def ray_inputs(self, rays, context_cameras, context):
        """Return the embedded inputs of the transformers for rays (B, ..., P) and V context views.

        query: (B, N, 1, Cr) Plücker coordinates of the query rays; depths: (B, N, P, Cd) the points'
        lengths; reference: (B, N, P, V, Cr) Plücker coordinates of the rays from each context camera
        centre through each point; patches: (B, N, P, V, 512 + 3) backbone features then colours read
        at each point's projection (all but patches harmonically embedded). This runs in float32 with
        autocast off: 16-bit NDC coordinates and high-frequency embeddings would be off by pixels.
        """
        n_query, n_points = rays.origins.shape[0], rays.lengths.shape[-1]
        n_views = context.images.shape[0]
        with torch.autocast(rays.origins.device.type, enabled=False):
            origins = rays.origins.float().reshape(n_query, -1, 1, 3)  # (B, N, 1, 3)
            directions = rays.directions.float().reshape(n_query, -1, 1, 3)
            lengths = rays.lengths.float().reshape(n_query, -1, n_points, 1)  # (B, N, P, 1)
            n_rays = origins.shape[1]
            query = self.harmonic_embedding(plucker_coordinates(origins, directions))
            depths = self.harmonic_embedding(lengths)
            points = origins + lengths * directions  # (B, N, P, 3)
            flat = points.reshape(n_query, -1, 3)  # (B, M = N·P, 3)
            if len(context_cameras) == n_views:
                xy = context_cameras.transform_points_ndc(flat.reshape(1, -1, 3))[..., :2]  # (V, B·M, 2)
                centres = context_cameras.get_camera_center().expand(n_query, -1, -1)  # (B, V, 3)
            elif len(context_cameras) == n_query * n_views:
                per_query = flat[:, None].expand(-1, n_views, -1, -1).reshape(n_query * n_views, -1, 3)
                xy = context_cameras.transform_points_ndc(per_query)[..., :2].unflatten(0, (n_query, n_views))
                xy = xy.transpose(0, 1).reshape(n_views, -1, 2)  # (V, B·M, 2)
                centres = context_cameras.get_camera_center().reshape(n_query, n_views, 3)
            else:
                raise ValueError(f"context_cameras must hold V={n_views} cameras or B·V={n_query * n_views} "
                                 f"(one set per query camera), got {len(context_cameras)}")
            centres = centres[:, None, None].float()  # (B, 1, 1, V, 3)
            reference = plucker_coordinates(centres, points[:, :, :, None] - centres)
            reference = self.harmonic_embedding(reference)  # (B, N, P, V, Cr)
            maps = torch.cat([sample_views(context.latents.float(), xy), sample_views(context.images.float(), xy)],
                             dim=-1)  # (V, B·M, 512 + 3)
            patches = maps.reshape(n_views, n_query, n_rays, n_points, -1).permute(1, 2, 3, 0, 4)
        return query, depths, reference, patches


def load_eft(path, config=None, map_location="cpu"):
    """Return an EpipolarFeatureTransformer with the weights of a `{'model_state_dict': ...}` checkpoint.

    Loading is strict: a missing, unexpected or mis-shaped key raises UserError naming it. The
    architecture is config, else the one our save_eft stored, else upstream's.
    """
    checkpoint = load_file(path, "EFT checkpoint", where_to_get="the SparseFusion release (ckpt_latest_eft.pt)",
                           map_location=map_location)
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise UserError(f"EFT checkpoint at {path} has no 'model_state_dict' (is it an EFT checkpoint?)")
    config = replace(stored_config(checkpoint, EFTConfig, config), backbone_weights="random")
    model = EpipolarFeatureTransformer(config)
    load_state_dict_strict(model, checkpoint["model_state_dict"], f"EFT checkpoint at {path}")
    return model


def save_eft(model, path, step=0):
    """Write `{'step': step, 'model_state_dict': ...}` (upstream's layout) plus our 'config' atomically to path."""
    return save_atomic(model_checkpoint(model, step), path)

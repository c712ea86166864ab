"""Per-category joint training of the EFT and the VLDM (upstream's train.py), under DDP, resumable.

One step, as upstream (Zhou & Tulsiani, CVPR 2023, Sec. 3.3): take a scene (views_per_scene random
frames of a sequence), draw a query view and 2–5 context views, re-express the cameras relative to the
query (query at the origin); the EFT renders a 32×32 grid of features and colours at the query; the
VAE encodes the query image to latents (×0.18215); the VLDM's ε-loss runs on diffusion_batch_size
copies of that latent at independent noise levels, masked to the valid region (the query's valid
region downsampled ×1/8, > 0.6); the EFT's pseudo-Huber colour loss compares its colours with the
query image read at the ray positions, with the same mask. loss = diffusion + colour; Adam for each
model, then StepLR for each.

    config = load_config("configs/train_small.yaml", ["category=hydrant", "dataset=synthetic"])
    run_training(config)                       # -g N processes, or the torchrun ones

Files under exp_dir: ckpt_latest.pt (VLDM, upstream's layout plus its architecture 'config', the
'train_config' and every rank's 'rng_state'), ckpt_latest_eft.pt (EFT, upstream's layout plus optimizer,
scheduler and architecture 'config'), ckpt_{step:06d}{,_eft}.pt
every archive_itr steps, config.yaml, log/train_{step:06d}.jpg (inputs | target | EFT | diffusion
sample), log/_loss.png and tensorboard/ (scalars and the same images).
"""

import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from tqdm import tqdm

from external.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from sparsefusion.cameras import PerspectiveCameras
from sparsefusion.checkpoint import config_to_dict, load_file, load_state_dict_strict, save_atomic
from sparsefusion.data import CO3DDataset, load_dataset
from sparsefusion.distributed import check_gpu_count, launch, under_torchrun
from sparsefusion.eft import EFTConfig, EpipolarFeatureTransformer, huber, sample_views
from sparsefusion.eft_render import RenderConfig, depth_range, feature_rays, render_features
from sparsefusion.errors import UserError
from sparsefusion.outputs import plot_losses, side_by_side, write_image, write_text
from sparsefusion.rays import RayBundle
from sparsefusion.relative_cameras import sample_query_and_context
from sparsefusion.vae import WHERE_TO_GET as VAE_WHERE_TO_GET
from sparsefusion.vae import LatentCodec, LatentCodecConfig, load_latent_codec
from sparsefusion.vldm import VLDM, VLDMConfig

PRECISIONS = ("fp32", "tf32", "bf16")
BACKENDS = ("auto", "nccl", "gloo")
VIS_SAMPLERS = ("ancestral", "plms")
RANDOM_VAE = "random"


@dataclass
class TrainConfig:
    """Everything train.py does; the defaults are upstream's train.py. YAML files and key=value override it."""

    # data
    category: str = "???"                # CO3D category (or 'all_ten' / 'all'), required (-c)
    dataset: str = "co3d"                # 'co3d' | 'co3d_toy' | 'synthetic' (-d)
    root: str = "data/${dataset}"        # dataset folder (-r)
    subset: str = "fewview_train"        # CO3D set list the scenes come from
    split: str = "train"                 # its part
    views_per_scene: int = 20            # random frames loaded per scene (upstream's sample_batch_size)
    image_size: int = 256                # side of the square images

    # where things are
    exp_dir: str = "output/sparsefusion_exp/demo_train/${category}_joint"  # checkpoints, logs; resumed from
    vae: str = "checkpoints/sd/sd-v1-3-vae.ckpt"  # SD VAE weights (-a); 'random' for smoke runs only
    init_eft: str = ""                   # EFT weights to start from when not resuming ('' = fresh)
    init_vldm: str = ""                  # VLDM weights to start from when not resuming ('' = fresh)

    # processes
    gpus: int = 1                        # processes on this machine, one GPU each (-g); torchrun sets its own
    port: int = 1                        # last digit of the rendezvous port 1234p (-p)
    backend: str = "auto"                # 'nccl' | 'gloo' | 'auto' (nccl on GPU, gloo on CPU) (-b)
    num_workers: int = 4                 # data loading processes per rank
    seed: int = 1                        # model init, data order and frame choice, per-rank draws (seed + rank)

    # one step
    num_input_range: List[int] = field(default_factory=lambda: [2, 6])  # [low, high): context views come
                                         # from torch.randint(low, high), so 2–5 (upstream's latest train.py)
    diffusion_batch_size: int = 12       # copies of the query latent, each at its own noise level
    feature_scale: int = 8               # EFT rays every feature_scale pixels: a 32×32 grid for 256
    n_points: int = 20                   # points per EFT ray
    depth_margin: float = 5.0            # ray points between d̄ − margin and d̄ + margin
    mask_threshold: float = 0.6          # loss mask: downsampled valid region > threshold

    # schedule
    iterations: int = 0                  # last step; 0 = max_epochs passes over the scenes (upstream)
    max_epochs: int = 1000               # passes over the scenes when iterations is 0
    repeat: int = 1                      # consecutive steps on each loaded scene
    lr: float = 5e-5                     # Adam learning rate of both models
    lr_step: int = 50000                 # StepLR: the rate is multiplied by lr_gamma every lr_step steps
    lr_gamma: float = 0.5
    reshuffle: bool = False              # new scene order each epoch; upstream never calls set_epoch (False)
    precision: str = "fp32"              # 'fp32' (PyTorch defaults, as upstream), 'tf32' (TF32 matmuls too)
                                         # or 'bf16' (autocast of EFT and UNet; EFT geometry and VAE stay fp32)

    # outputs
    log_itr: int = 50                    # tqdm, TensorBoard and the loss curve get the mean loss every log_itr
    vis_itr: int = 100                   # visualisation image every vis_itr steps (0 = never)
    vis_sampler: str = "ancestral"       # sampler of the visualised diffusion sample: 'ancestral' (500 steps,
                                         # upstream) or 'plms' (50 steps)
    save_itr: int = 1000                 # ckpt_latest{,_eft}.pt every save_itr steps and at the last step
    archive_itr: int = 50000             # ckpt_{step:06d}{,_eft}.pt every archive_itr steps (0 = never)
    tensorboard: bool = True             # write TensorBoard scalars and images under exp_dir/tensorboard

    # models (defaults: upstream's; see configs/train_small.yaml for tiny ones)
    eft: EFTConfig = field(default_factory=EFTConfig)
    vldm: VLDMConfig = field(default_factory=VLDMConfig)
    autoencoder: AutoencoderKLConfig = field(default_factory=AutoencoderKLConfig)

    def render_config(self):
        """Return the RenderConfig of the EFT's feature grid (upstream mode: BatchNorm batch statistics, dropout)."""
        return RenderConfig(image_size=self.image_size, scale=self.feature_scale, n_points=self.n_points,
                            depth_margin=self.depth_margin, precision="bf16" if self.precision == "bf16" else "fp32")


def check_config(config):
    """Raise UserError naming the first setting that is out of range or inconsistent with another."""
    choices = {"precision": PRECISIONS, "backend": BACKENDS, "vis_sampler": VIS_SAMPLERS}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise UserError(f"{name} must be one of {list(allowed)}, got {getattr(config, name)!r}")
    low_high = list(config.num_input_range)
    if len(low_high) != 2 or not 1 <= low_high[0] < low_high[1]:
        raise UserError(f"num_input_range must be [low, high) with 1 <= low < high, got {low_high}")
    if low_high[1] - 1 > config.views_per_scene:
        raise UserError(f"num_input_range {low_high} draws up to {low_high[1] - 1} context views but a scene "
                        f"has views_per_scene={config.views_per_scene}")
    positive = ("views_per_scene", "image_size", "diffusion_batch_size", "feature_scale", "n_points", "max_epochs",
                "repeat", "lr_step", "log_itr", "save_itr")
    for name in positive:
        if getattr(config, name) < 1:
            raise UserError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.image_size % config.feature_scale:
        raise UserError(f"image_size {config.image_size} must be a multiple of feature_scale {config.feature_scale}")
    vae_factor = 2 ** (len(config.autoencoder.ch_mult) - 1)
    if vae_factor != config.feature_scale:
        raise UserError(f"the VAE downsamples ×{vae_factor} (autoencoder.ch_mult) but the EFT feature grid is every "
                        f"feature_scale={config.feature_scale} pixels; the latents and features must align")
    if config.eft.hidden_dim != config.vldm.unet.cond_images_channels:
        raise UserError(f"eft.hidden_dim ({config.eft.hidden_dim}) must equal vldm.unet.cond_images_channels "
                        f"({config.vldm.unet.cond_images_channels}): the EFT features condition the UNet")
    if config.autoencoder.embed_dim != config.vldm.unet.channels:
        raise UserError(f"autoencoder.embed_dim ({config.autoencoder.embed_dim}) must equal vldm.unet.channels "
                        f"({config.vldm.unet.channels})")


def load_config(path=None, overrides=(), **fields):
    """Return the TrainConfig of the defaults, then a YAML file, then fields (e.g. flags), then key=value overrides.

    Unknown keys, wrong types and a missing category raise UserError.
    """
    try:
        merged = OmegaConf.structured(TrainConfig)
        if path:
            if not Path(path).is_file():
                raise UserError(f"config file {path} not found")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        merged = OmegaConf.merge(merged, OmegaConf.create(fields), OmegaConf.from_dotlist(list(overrides)))
        if OmegaConf.is_missing(merged, "category"):
            raise UserError("no category given: pass -c CATEGORY (or category=... / a YAML config)")
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f" at '{key}'" if key else ""
        raise UserError(f"bad training config{where}: {str(err).splitlines()[0]}; keys are the fields of "
                        f"sparsefusion.training.TrainConfig") from err
    check_config(config)
    return config


def config_yaml(config):
    """Return the resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


# ---------------------------------------------------------------------------------------------
# One step


@dataclass
class TrainingBatch:
    """One step's inputs: a query view and its context views, cameras relative to the query (at the origin)."""

    query_cameras: PerspectiveCameras     # (1) the query camera: R = I, T = 0
    context_cameras: PerspectiveCameras   # (V)
    context_images: torch.Tensor          # (V, 3, H, W) in [0, 1]
    near: float                           # depth range of the ray points: d̄ ∓ depth_margin
    far: float
    rays: RayBundle                       # (1, h, w, P) the EFT's feature rays of the query camera
    target_colors: torch.Tensor           # (1, h, w, 3) the query image at the rays' NDC xy
    latents: torch.Tensor                 # (1, 4, h, w) the query image's VAE latents, scaled
    loss_mask: torch.Tensor               # (1, 1, h, w) 1 inside the valid region, else 0
    query_image: torch.Tensor             # (1, 3, H, W) in [0, 1]


def colors_at_rays(images, xys):
    """Return images (B, 3, H, W) read bilinearly at NDC xys (B, ..., 2), as (B, ..., 3).

    Upstream's sample_images_at_mc_locs: grid_sample at −xy with align_corners=True (NDC ±1 at the
    outer pixel centres). Our rays lie inside ±1, where border and zero padding agree.
    """
    flat = sample_views(images, xys.reshape(xys.shape[0], -1, 2))  # (B, M, 3)
    return flat.reshape(*xys.shape[:-1], images.shape[1])


def valid_loss_mask(valid_region, scale, threshold=0.6):
    """Return the (B, 1, H/scale, W/scale) 0/1 loss mask: valid_region (B, 1, H, W) bilinearly shrunk, > threshold."""
    small = F.interpolate(valid_region, scale_factor=1.0 / scale, mode="bilinear")
    return (small > threshold).to(valid_region.dtype)


def draw_query_and_context_size(n_views, num_input_range):
    """Return (query index (1,), context size): upstream's randperm(N)[:1], then randint(low, high)."""
    query = torch.randperm(n_views)[:1]
    context_size = int(torch.randint(num_input_range[0], num_input_range[1], (1,)))
    return query, context_size


def training_batch(scene, codec, config, device):
    """Return the TrainingBatch of a scene (on any device) for one step, drawn with the global RNG, on device.

    Draws in upstream's order: the query (randperm), the number of context views (randint), the
    context views (randperm; they may include the query). d̄ comes from the scene's absolute cameras.
    """
    query, context_size = draw_query_and_context_size(len(scene), config.num_input_range)
    views = sample_query_and_context(scene.cameras.cpu(), scene.images, query_index=query,
                                     context_size=context_size, center_at_origin=True)
    near, far = depth_range(scene.cameras.cpu(), config.depth_margin)
    query_image = views.query_images.to(device)
    valid = scene.valid_region[views.query_index.to(scene.valid_region.device)].to(device)
    rays = feature_rays(views.query_cameras.to(device), near, far, config.render_config())
    with torch.no_grad():
        latents = codec.encode_images(query_image)
    return TrainingBatch(
        query_cameras=views.query_cameras.to(device),
        context_cameras=views.context_cameras.to(device),
        context_images=views.context_images.to(device),
        near=near,
        far=far,
        rays=rays,
        target_colors=colors_at_rays(query_image, rays.xys),
        latents=latents,
        loss_mask=valid_loss_mask(valid, config.feature_scale, config.mask_threshold),
        query_image=query_image,
    )


class JointModel(nn.Module):
    """The EFT and the VLDM trained together; one module, so one DDP wrapper syncs both."""

    def __init__(self, eft, vldm):
        super().__init__()
        self.eft = eft
        self.vldm = vldm

    def forward(self, batch, copies):
        """Return {'total', 'diffusion', 'color'} (scalars) and 'rgb' (1, h, w, 3) for a TrainingBatch.

        The VLDM loss runs on `copies` copies of the query latent with the EFT features (1, C, h, w)
        as condition and loss_mask on every latent channel; the colour loss is the mean masked
        pseudo-Huber error of the EFT colours.
        """
        context = self.eft.encode(batch.context_images)
        rendered = self.eft(batch.rays, batch.context_cameras, context)
        features = rendered.features.permute(0, 3, 1, 2)  # (1, C, h, w)
        latents = batch.latents
        mask = batch.loss_mask.expand(copies, latents.shape[1], -1, -1)
        diffusion = self.vldm(latents.expand(copies, -1, -1, -1), features.expand(copies, -1, -1, -1),
                              loss_mask=mask).float()
        color_mask = batch.loss_mask.permute(0, 2, 3, 1)  # (1, h, w, 1)
        color = (huber(rendered.rgb.float(), batch.target_colors) * color_mask).mean()
        return {"total": diffusion + color, "diffusion": diffusion, "color": color, "rgb": rendered.rgb}


def precision_context(device, precision):
    """Return the autocast context of a precision: bf16 autocast for 'bf16', none otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def set_matmul_precision(precision):
    """Allow TF32 matmuls for 'tf32' and restore PyTorch's default ('highest') otherwise."""
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"


def train_step(model, optimizers, schedulers, batch, copies, precision, device):
    """Run one optimisation step and return the detached losses {'total', 'diffusion', 'color'}.

    model: a JointModel, or its DDP wrapper. As upstream: zero both gradients, one backward of
    diffusion + colour, then each optimizer step followed by its scheduler step (VLDM first).
    """
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    with precision_context(device, precision):
        losses = model(batch, copies)
    losses["total"].backward()
    for optimizer, scheduler in zip(optimizers, schedulers):
        optimizer.step()
        scheduler.step()
    return {name: losses[name].detach() for name in ("total", "diffusion", "color")}


# ---------------------------------------------------------------------------------------------
# Models, data, checkpoints


def build_codec(config, device):
    """Return the frozen LatentCodec: the VAE at config.vae, or a random one for config.vae == 'random'.

    It runs in fp32 whatever config.precision says: for one image bf16 is slower and ~1 % off (docs/vae.md).
    """
    codec_config = LatentCodecConfig(precision="fp32")
    if config.vae == RANDOM_VAE:
        warnings.warn("training with a randomly initialised VAE (vae=random): for smoke runs only", stacklevel=2)
        return LatentCodec(AutoencoderKL(config.autoencoder), codec_config).to(device)
    return load_latent_codec(config.vae, device=device, config=codec_config, vae_config=config.autoencoder)


def check_inputs(config):
    """Raise UserError if the VAE or an init checkpoint the config names is missing (before spawning ranks)."""
    if config.vae != RANDOM_VAE and not Path(config.vae).is_file():
        raise UserError(f"SD VAE checkpoint not found at {config.vae}; get it from {VAE_WHERE_TO_GET} "
                        f"(or pass -a/--vae PATH)")
    for name in ("init_eft", "init_vldm"):
        path = getattr(config, name)
        if path and not Path(path).is_file():
            raise UserError(f"{name} checkpoint not found at {path}")


def open_dataset(config):
    """Return the training scenes the config names (UserError if they are missing)."""
    options = {} if config.dataset == "co3d_toy" else {"image_size": config.image_size}
    return load_dataset(config.dataset, config.root, config.category, subset=config.subset, split=config.split,
                        sample_batch_size=config.views_per_scene, **options)


class SeededScenes(torch.utils.data.Dataset):
    """dataset[(epoch, index)]: scene index, its random frames seeded by (seed, epoch, index).

    The frame choice is then the same whichever worker loads it and whether or not the run resumed.
    """

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if isinstance(self.dataset, CO3DDataset):
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + index)
            return self.dataset.scene(index, generator)
        return self.dataset[index]


def checkpoint_paths(exp_dir, name):
    """Return (VLDM path, EFT path) of a checkpoint name: 'latest' or a zero-padded step."""
    return Path(exp_dir) / f"ckpt_{name}.pt", Path(exp_dir) / f"ckpt_{name}_eft.pt"


def save_together(objects):
    """Write {path: object} so that each file appears only when all are written (pending files, then renames)."""
    pending = {path: save_atomic(obj, path.with_name(f".{path.name}.pending")) for path, obj in objects.items()}
    for path, temporary in pending.items():
        os.replace(temporary, path)


def rng_state(device):
    """Return this process's random state: {'torch': CPU state, 'cuda': the device's state or None}."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def tensorboard_writer(folder):
    """Return a TensorBoard SummaryWriter writing to folder; UserError if tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise UserError("TensorBoard logging needs the tensorboard package: pip install tensorboard, "
                        "or set tensorboard=false") from err
    return SummaryWriter(str(folder))


def seed_rank(seed, rank):
    """Seed the global CPU and CUDA generators of a rank: every rank draws its own steps."""
    torch.manual_seed(seed + rank)


class Trainer:
    """One rank's training: models, optimizers, data, checkpoints and (on rank 0) logs; train() runs it."""

    def __init__(self, config, rank):
        check_config(config)
        self.config = config
        self.rank = rank
        self.device = rank.device
        self.exp_dir = Path(config.exp_dir)
        set_matmul_precision(config.precision)
        torch.backends.cudnn.benchmark = True  # fixed shapes but for the 2–5 context views: autotune once each

        torch.manual_seed(config.seed)  # identical initial weights on every rank
        eft = EpipolarFeatureTransformer(config.eft)
        vldm = VLDM(config.vldm)
        self.model = JointModel(eft, vldm).to(self.device).train()
        self.codec = build_codec(config, self.device)
        self.optimizers, self.schedulers = [], []
        for module in (vldm, eft):  # upstream steps the VLDM's optimizer first
            optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
            self.optimizers.append(optimizer)
            self.schedulers.append(torch.optim.lr_scheduler.StepLR(optimizer, config.lr_step, config.lr_gamma))

        self.step = 0
        seed_rank(config.seed, rank.rank)
        if checkpoint_paths(self.exp_dir, "latest")[0].is_file():
            self.resume()
        else:
            self.load_initial_weights()
        self.ddp = self.model
        if rank.world_size > 1:
            # ResNet-18's layer4/fc and the UNet's null_conditional_* get no gradient
            self.ddp = nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)

        self.dataset = SeededScenes(open_dataset(config), config.seed)
        self.loss_history = []
        self.last_losses = None
        self.writer = None
        if rank.is_main:
            self.exp_dir.mkdir(parents=True, exist_ok=True)
            write_text(config_yaml(config), self.exp_dir / "config.yaml")
            if config.tensorboard:
                self.writer = tensorboard_writer(self.exp_dir / "tensorboard")

    @property
    def eft(self):
        return self.model.eft

    @property
    def vldm(self):
        return self.model.vldm

    # -- data order ---------------------------------------------------------------------------

    def epoch_keys(self, epoch):
        """Return this rank's (epoch, scene index) keys of an epoch: a DistributedSampler's order, as upstream."""
        sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=self.rank.world_size,
                                                      rank=self.rank.rank, shuffle=True, seed=self.config.seed)
        sampler.set_epoch(epoch if self.config.reshuffle else 0)
        return [(epoch, index) for index in sampler]

    def steps_per_epoch(self):
        return len(self.epoch_keys(0)) * self.config.repeat

    def last_step(self):
        """Return the step training stops at: iterations, or max_epochs passes over the scenes."""
        return self.config.iterations or self.config.max_epochs * self.steps_per_epoch()

    def scenes(self, start_step):
        """Yield the scene of every step from start_step on, each scene `repeat` times in a row."""
        repeat = self.config.repeat
        epoch, position = divmod(start_step, self.steps_per_epoch())
        first, skip = divmod(position, repeat)
        while True:
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=None, sampler=self.epoch_keys(epoch)[first:],
                num_workers=self.config.num_workers,
                generator=torch.Generator().manual_seed(self.config.seed))  # leaves the global RNG alone
            for scene in loader:
                for _ in range(skip, repeat):
                    yield epoch, scene
                skip = 0
            epoch, first = epoch + 1, 0

    # -- training -----------------------------------------------------------------------------

    def train(self):
        """Train from the current step to the last step; return the last step."""
        config, last = self.config, self.last_step()
        bar = tqdm(total=last, initial=self.step, disable=not self.rank.is_main, dynamic_ncols=True)
        sums, count = torch.zeros(3, device=self.device), 0
        stream = self.scenes(self.step)
        try:
            while self.step < last:
                epoch, scene = next(stream)
                batch = training_batch(scene, self.codec, config, self.device)
                losses = train_step(self.ddp, self.optimizers, self.schedulers, batch, config.diffusion_batch_size,
                                    config.precision, self.device)
                self.last_losses = losses
                self.step += 1
                bar.update(1)
                sums += torch.stack([losses["total"], losses["diffusion"], losses["color"]])
                count += 1
                if self.step % config.log_itr == 0 or self.step == last:
                    self.log(sums / count, epoch, bar)
                    sums, count = torch.zeros_like(sums), 0
                if config.vis_itr and self.step % config.vis_itr == 0 and self.rank.is_main:
                    self.visualize(scene)
                if self.step % config.save_itr == 0 or self.step == last:
                    self.save("latest")
                if config.archive_itr and self.step % config.archive_itr == 0:
                    self.save(f"{self.step:06d}")
        finally:
            stream.close()
            bar.close()
            if self.writer is not None:
                self.writer.close()
        return self.step

    def log(self, means, epoch, bar):
        """Average the interval's mean losses over ranks; rank 0 shows and records them."""
        if self.rank.world_size > 1:
            dist.all_reduce(means)
            means /= self.rank.world_size
        if not self.rank.is_main:
            return
        total, diffusion, color = means.tolist()
        lr = self.schedulers[0].get_last_lr()[0]
        bar.set_description(f"epoch={epoch} lr={lr:1.2e} loss={total:.4f}")
        self.loss_history.append(total)
        if self.writer is not None:
            for name, value in (("loss/total", total), ("loss/diffusion", diffusion), ("loss/color", color),
                                ("lr", lr)):
                self.writer.add_scalar(name, value, self.step)

    @torch.no_grad()
    def visualize(self, scene):
        """Write log/train_{step:06d}.jpg: context views | target | EFT colours | a diffusion sample.

        A fresh query and context are drawn from the scene, as upstream does; the draws, the EFT's
        dropout and the sampler run on a forked random state, so visualising changes no training draw.
        """
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            batch = training_batch(scene, self.codec, self.config, self.device)
            packed = render_features(self.eft, batch.query_cameras, batch.context_cameras, batch.context_images,
                                     batch.near, batch.far, self.config.render_config())
            rgb, features = packed.permute(0, 3, 1, 2).split([3, packed.shape[-1] - 3], dim=1)
            with precision_context(self.device, self.config.precision):
                latents = self.vldm.sample(features, sampler=self.config.vis_sampler)
            sample = self.codec.decode_latents(latents.float())
        eft_image = F.interpolate(rgb, scale_factor=self.config.feature_scale, mode="bilinear").clamp(0, 1)
        panels = [*batch.context_images, batch.query_image[0], eft_image[0], sample[0]]
        image = side_by_side([panel.permute(1, 2, 0).float().cpu().numpy() for panel in panels])
        write_image(image, self.exp_dir / "log" / f"train_{self.step:06d}.jpg")
        if self.loss_history:
            plot_losses({"loss": self.loss_history}, self.exp_dir / "log" / "_loss.png",
                        title=f"mean loss per {self.config.log_itr} steps")
        if self.writer is not None:
            self.writer.add_image("visualisation", image, self.step, dataformats="HWC")

    # -- checkpoints --------------------------------------------------------------------------

    def gathered_rng_states(self):
        """Return every rank's random state, in rank order (collective: all ranks call it)."""
        state = rng_state(self.device)
        if self.rank.world_size == 1:
            return [state]
        states = [None] * self.rank.world_size
        dist.all_gather_object(states, state)
        return states

    def save(self, name):
        """Write ckpt_{name}.pt and ckpt_{name}_eft.pt on rank 0 (collective: all ranks call it)."""
        states = self.gathered_rng_states()
        if not self.rank.is_main:
            return
        vldm_path, eft_path = checkpoint_paths(self.exp_dir, name)
        vldm_optimizer, eft_optimizer = self.optimizers
        vldm_scheduler, eft_scheduler = self.schedulers
        save_together({
            vldm_path: {
                "step": self.step,
                "model_state_dict": self.vldm.state_dict(),
                "optimizer_state_dict": vldm_optimizer.state_dict(),
                "scheduler_state_dict": vldm_scheduler.state_dict(),
                "config": config_to_dict(self.vldm.config),
                "train_config": config_to_dict(self.config),
                "rng_state": states,
            },
            eft_path: {
                "step": self.step,
                "model_state_dict": self.eft.state_dict(),
                "optimizer_state_dict": eft_optimizer.state_dict(),
                "scheduler_state_dict": eft_scheduler.state_dict(),
                "config": config_to_dict(self.eft.config),
            },
        })

    def resume(self):
        """Load weights, optimizers, schedulers, step and random state from exp_dir's latest checkpoints."""
        vldm_path, eft_path = checkpoint_paths(self.exp_dir, "latest")
        where = "a checkpoint written by train.py"
        vldm_ckpt = self.vldm.load_checkpoint(vldm_path)
        eft_ckpt = load_file(eft_path, "EFT checkpoint to resume from", where_to_get=where)
        for path, ckpt in ((vldm_path, vldm_ckpt), (eft_path, eft_ckpt)):
            missing = [k for k in ("step", "optimizer_state_dict", "scheduler_state_dict") if k not in ckpt]
            if missing:
                raise UserError(f"{path} lacks {missing}, so training cannot resume from it; move it out of "
                                f"{self.exp_dir} to start afresh (use init_eft / init_vldm to start from weights)")
        if vldm_ckpt["step"] != eft_ckpt["step"]:
            raise UserError(f"{vldm_path} is at step {vldm_ckpt['step']} but {eft_path} at step {eft_ckpt['step']}; "
                            f"copy a matching ckpt_{{step}}.pt / ckpt_{{step}}_eft.pt pair over them")
        load_state_dict_strict(self.eft, eft_ckpt["model_state_dict"], f"EFT checkpoint {eft_path}")
        for optimizer, scheduler, ckpt in zip(self.optimizers, self.schedulers, (vldm_ckpt, eft_ckpt)):
            optimizer.load_state_dict(ckpt["optimizer_state_dict"])
            scheduler.load_state_dict(ckpt["scheduler_state_dict"])
        self.step = int(vldm_ckpt["step"])
        states = vldm_ckpt.get("rng_state") or []
        if len(states) == self.rank.world_size:
            set_rng_state(states[self.rank.rank], self.device)
        else:
            warnings.warn(f"{vldm_path} holds the random state of {len(states)} ranks, not {self.rank.world_size}; "
                          f"reseeding from seed + rank + step", stacklevel=2)
            seed_rank(self.config.seed + self.step, self.rank.rank)
        if self.rank.is_main:
            print(f"resuming from {vldm_path} at step {self.step}")

    def load_initial_weights(self):
        """Load init_eft / init_vldm weights (strictly) when given; otherwise keep the fresh initialisation."""
        if self.config.init_eft:
            ckpt = load_file(self.config.init_eft, "EFT checkpoint (init_eft)")
            load_state_dict_strict(self.eft, ckpt.get("model_state_dict", ckpt), f"init_eft {self.config.init_eft}")
        if self.config.init_vldm:
            self.vldm.load_checkpoint(self.config.init_vldm)


def train_worker(rank, config):
    """Train on one rank (the function launch() runs in every process)."""
    Trainer(config, rank).train()


def run_training(config):
    """Check inputs, then train in config.gpus local processes (or in the torchrun processes)."""
    check_inputs(config)
    if not under_torchrun():
        check_gpu_count(config.gpus)
        if config.gpus > 1:
            open_dataset(config)  # a missing dataset stops here with its message, not in every spawned rank
    backend = None if config.backend == "auto" else config.backend
    launch(train_worker, config.gpus, config.port, backend=backend, args=(config,))

"""train.py's configuration: TrainConfig, its checks, and YAML / key=value layering.

Two stages share train.py (sparsefusion/trainer.py runs either):
  stage=joint  the EFT and the VLDM trained together, the VAE frozen: upstream's train.py
               (sparsefusion/joint_objective.py);
  stage=vae    an AutoencoderKL trained on the dataset's images, for models that do not use Stable
               Diffusion's VAE, such as the mini models (sparsefusion/vae_objective.py).

    config = load_config("configs/mini_train.yaml", ["stage=vae"])
    run_training(config)                       # sparsefusion.trainer; -g N processes, or torchrun's
"""

from dataclasses import asdict, dataclass, field
from typing import List

from omegaconf import OmegaConf

from sparsefusion.external.autoencoder_kl import AutoencoderKLConfig
from sparsefusion.config import check_choice, load_layered
from sparsefusion.data.crop import RESIZE_MODES
from sparsefusion.eft import EFTConfig
from sparsefusion.eft_render import FeatureRenderConfig
from sparsefusion.distributed import check_port
from sparsefusion.errors import UserError, problems_of, raise_problems
from sparsefusion.vldm import VLDMConfig

STAGES = ("joint", "vae")
PRECISIONS = ("fp32", "tf32", "bf16")  # of sparsefusion.precision's
BACKENDS = ("auto", "nccl", "gloo")
VIS_SAMPLERS = ("ancestral", "plms")
VAE_TRAINS = ("all", "decoder")
RANDOM_VAE = "random"


@dataclass
class TrainConfig:
    """Everything train.py does; the defaults are upstream's train.py. YAML files and key=value override it."""

    stage: str = "joint"                 # 'joint': EFT + VLDM, VAE frozen (upstream); 'vae': train the VAE itself

    # data
    category: str = "???"                # CO3D category (or 'all_ten' / 'all'), required (-c)
    dataset: str = "co3d"                # 'co3d' | 'co3d_toy' | 'synthetic' (-d)
    root: str = "data/${dataset}"        # dataset folder (-r)
    subset: str = "fewview_train"        # CO3D set list the scenes come from
    split: str = "train"                 # its part
    views_per_scene: int = 20            # random frames loaded per scene (upstream's sample_batch_size); the
                                         # vae stage trains on all of them at once
    image_size: int = 256                # side of the square images
    resize_mode: str = "upstream"        # cameras of resized frames: 'upstream' (one nominal scale, a quirk) or
                                         # 'exact' (per-axis scales; docs/data.md); not for co3d_toy

    # where things are
    exp_dir: str = "output/sparsefusion_exp/demo_train/${category}_${stage}"  # checkpoints, logs; resumed from
    vae: str = "checkpoints/sd/sd-v1-3-vae.ckpt"  # SD VAE weights (-a); 'random' for smoke runs only
    init_eft: str = ""                   # EFT weights to start from when not resuming ('' = fresh)
    init_vldm: str = ""                  # VLDM weights to start from when not resuming ('' = fresh)
    init_vae: str = ""                   # vae stage: VAE weights to start from when not resuming ('' = fresh)

    # processes
    gpus: int = 1                        # processes on this machine, one GPU each (-g); torchrun sets its own
    port: int = 1                        # last digit of the rendezvous port 1234p (-p)
    backend: str = "auto"                # 'nccl' | 'gloo' | 'auto' (nccl on GPU, gloo on CPU) (-b)
    num_workers: int = 4                 # data loading processes per rank
    seed: int = 1                        # model init, data order and frame choice, per-rank draws (seed + rank)

    # one step
    num_input_range: List[int] = field(default_factory=lambda: [2, 6])  # [low, high): context views come
                                         # from torch.randint(low, high), so 2–5 (upstream's latest train.py)
    queries_per_step: int = 1            # query views per step, each in its own frame, sharing the context
                                         # views (upstream: 1); the EFT renders them all in one batch
    diffusion_batch_size: int = 12       # copies of each query latent, each at its own noise level
    feature_scale: int = 8               # EFT rays every feature_scale pixels: a 32×32 grid for 256
    n_points: int = 20                   # points per EFT ray
    depth_margin: float = 5.0            # ray points between d̄ − margin and d̄ + margin
    mask_threshold: float = 0.6          # loss mask: downsampled valid region > threshold
    kl_weight: float = 1e-6              # vae stage: weight of the KL term against the summed L1 error (LDM's)
    perceptual_weight: float = 0.0       # vae stage: weight of LPIPS(VGG) per pixel beside the L1 error
                                         # (LDM's: 1.0; needs the VGG weights, docs/metrics.md)
    vae_trains: str = "all"              # vae stage: 'all', or 'decoder': the encoder frozen, so the latents and
                                         # a VLDM trained on them stay valid (as SD's fine-tuned ft-MSE decoder)

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
        """Return the FeatureRenderConfig of the EFT's feature grid (upstream mode: BatchNorm batch statistics, dropout)."""
        return FeatureRenderConfig(image_size=self.image_size, scale=self.feature_scale, n_points=self.n_points,
                            depth_margin=self.depth_margin, precision="bf16" if self.precision == "bf16" else "fp32")


def config_problems(config):
    """Return one line for every setting that is out of range or inconsistent with another."""
    choices = {"stage": STAGES, "precision": PRECISIONS, "backend": BACKENDS, "vis_sampler": VIS_SAMPLERS,
               "resize_mode": RESIZE_MODES, "vae_trains": VAE_TRAINS}
    problems = problems_of(*[lambda name=name, allowed=allowed: check_choice(name, getattr(config, name), allowed,
                                                                             UserError)
                             for name, allowed in choices.items()])
    low_high = list(config.num_input_range)
    if len(low_high) != 2 or not 1 <= low_high[0] < low_high[1]:
        problems.append(f"num_input_range must be [low, high) with 1 <= low < high, got {low_high}")
    elif low_high[1] - 1 > config.views_per_scene and config.stage == "joint":
        problems.append(f"num_input_range {low_high} draws up to {low_high[1] - 1} context views but a scene has "
                        f"views_per_scene={config.views_per_scene}; e.g. views_per_scene={low_high[1] - 1}")
    if config.stage == "joint" and (config.init_vae or config.vae_trains != "all"):
        problems.append("init_vae and vae_trains are settings of stage=vae; the joint stage encodes with `vae`")
    if config.queries_per_step > config.views_per_scene:
        problems.append(f"queries_per_step={config.queries_per_step} is more than views_per_scene="
                        f"{config.views_per_scene}: the queries are distinct views of one scene")
    positive = ("views_per_scene", "image_size", "queries_per_step", "diffusion_batch_size", "feature_scale",
                "n_points", "max_epochs", "repeat", "lr_step", "log_itr", "save_itr")
    problems += [f"{name} must be at least 1, got {getattr(config, name)}" for name in positive
                 if getattr(config, name) < 1]
    problems += [f"{name} must be 0 ({meaning}) or more, got {getattr(config, name)}"
                 for name, meaning in (("iterations", "max_epochs passes"), ("vis_itr", "never"),
                                       ("archive_itr", "never")) if getattr(config, name) < 0]
    problems += problems_of(lambda: check_port(config.port))
    if config.lr <= 0 or config.lr != config.lr:
        problems.append(f"lr must be a positive number, got {config.lr}")
    if config.feature_scale >= 1 and config.image_size % config.feature_scale:
        problems.append(f"image_size {config.image_size} must be a multiple of feature_scale {config.feature_scale}; "
                        f"e.g. image_size={max(1, config.image_size // config.feature_scale) * config.feature_scale}")
    vae_factor = 2 ** (len(config.autoencoder.ch_mult) - 1)
    if vae_factor != config.feature_scale:
        problems.append(f"the VAE downsamples ×{vae_factor} (autoencoder.ch_mult) but the EFT feature grid is every "
                        f"feature_scale={config.feature_scale} pixels; the latents and features must align: "
                        f"e.g. feature_scale={vae_factor}")
    if config.eft.hidden_dim != config.vldm.unet.cond_images_channels:
        problems.append(f"eft.hidden_dim ({config.eft.hidden_dim}) must equal vldm.unet.cond_images_channels "
                        f"({config.vldm.unet.cond_images_channels}): the EFT features condition the UNet")
    if config.autoencoder.embed_dim != config.vldm.unet.channels:
        problems.append(f"autoencoder.embed_dim ({config.autoencoder.embed_dim}) must equal vldm.unet.channels "
                        f"({config.vldm.unet.channels})")
    return problems


def check_config(config):
    """Raise one UserError naming every setting that is out of range or inconsistent with another."""
    raise_problems(config_problems(config))


# What a resumed run may take from its command line rather than from its checkpoint: where things are,
# the processes, how long and how often, precision, and the learning-rate schedule (applied to the
# optimizers). Every other field defines the run and must match the one stored in its checkpoint.
FREE_ON_RESUME = ("root", "exp_dir", "vae", "init_eft", "init_vldm", "init_vae", "gpus", "port", "backend",
                  "num_workers", "iterations", "max_epochs", "precision", "log_itr", "vis_itr", "vis_sampler", "save_itr",
                  "archive_itr", "tensorboard")
SCHEDULE = ("lr", "lr_step", "lr_gamma")


def flat_fields(data, prefix=""):
    """Return a config dict as {dotted name: value}, tuples as lists."""
    flat = {}
    for name, value in data.items():
        if isinstance(value, dict):
            flat.update(flat_fields(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = list(value) if isinstance(value, tuple) else value
    return flat


def changed_fields(stored, config):
    """Return [(dotted name, stored value, config's value)] of the fields that differ; [] without a stored config.

    A field the stored config lacks was added after the run was saved, with the behaviour it had as its
    default: it counts as the default.
    """
    if not isinstance(stored, dict):
        return []
    now = flat_fields(asdict(config))
    before = {**flat_fields(asdict(type(config)())), **flat_fields(stored)}
    return [(name, before.get(name), now.get(name)) for name in sorted(set(before) | set(now))
            if before.get(name) != now.get(name)]


def resume_conflicts(stored, config):
    """Return 'name=stored (asked: value)' for each setting a resumed run may not change but the config does."""
    return [f"{name}={old!r} (asked: {new!r})" for name, old, new in changed_fields(stored, config)
            if name.split(".")[0] not in FREE_ON_RESUME + SCHEDULE]


def schedule_changes(stored, config):
    """Return 'lr 0.001 (was 5e-05)'-like lines of the learning-rate settings a resumed run changes."""
    return [f"{name} {new} (was {old})" for name, old, new in changed_fields(stored, config) if name in SCHEDULE]


def apply_schedule(optimizer, scheduler, config):
    """Set a resumed StepLR run to config's lr, lr_step, lr_gamma as if it had used them from step 0."""
    scheduler.step_size, scheduler.gamma = config.lr_step, config.lr_gamma
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
        group["lr"] = config.lr * config.lr_gamma ** (scheduler.last_epoch // config.lr_step)


def load_config(path=None, overrides=(), **fields):
    """Return the TrainConfig of the defaults, then a YAML file, then fields (e.g. flags), then key=value overrides.

    Unknown keys, wrong types and a missing category raise UserError.
    """
    config = load_layered(TrainConfig, path, overrides, fields, what="training config")
    check_config(config)
    return config


def config_yaml(config):
    """Return the resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


"""demo.py's configuration: DemoConfig, its checks, and layering of defaults, YAML, flags and key=value.

The same mechanism as train.py's (sparsefusion/training.py): DemoConfig's defaults are upstream's
demo; a YAML file (--config, or --mini for configs/mini_demo.yaml) overrides them, then the flags
(upstream's short ones and a few long aliases), then key=value overrides of any field, nested ones
dotted (distill.iterations=500, distill.nerf.num_levels=8).

    config = load_demo_config("configs/mini_demo.yaml", ["idx=0,1"], category="hydrant")
"""

from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import List

from sparsefusion.config import check_choice, load_layered, parse_index_list
from sparsefusion.data import CO3D_ALL_CATEGORIES, SCENE_SOURCES, expand_categories
from sparsefusion.data.crop import RESIZE_MODES
from sparsefusion.data.custom import CustomOptions, check_custom_options
from sparsefusion.distill import METHODS, DistillConfig
from sparsefusion.distributed import check_port
from sparsefusion.errors import UserError, problems_of, raise_problems
from sparsefusion.sampling import HIGH_NOISE_STARTS

UNET_MODES = ("eager", "graph", "compile")
EFT_MODES = ("upstream", "eval")
PRECISIONS = ("fp32", "bf16")


@dataclass
class GenerateConfig:
    """How demo.py writes a synthetic dataset whose category is missing (scenes 0: never, it stops instead)."""

    scenes: int = 0                      # scenes per category, all of them evaluation scenes
    frames: int = 32                     # views per scene
    seed: int = 1                        # everything follows from it; training data uses other seeds
    image_sizes: List[str] = field(default_factory=lambda: ["84x112", "112x84"])  # HxW, used by scenes in turn
    workers: int = 2                     # rendering processes


@dataclass
class DemoConfig:
    """Everything demo.py does; the defaults are upstream's demo."""

    # what to reconstruct
    dataset_name: str = "co3d_toy"       # 'co3d' | 'co3d_toy' | 'synthetic' | 'custom': your own scene folder (-d)
    root: str = ""                       # dataset folder, or the scene folder of 'custom' (-r); '' = data/{dataset_name}
    category: str = "???"                # a category, comma-separated categories, 'all_ten' or 'all' (-c), required
    idx: str = "0"                       # scene indices, comma-separated (-i)
    input_views: int = 2                 # random input views per scene (-v)
    input_names: str = ""                # or these input views: image names (path, file name or stem), comma-separated
    input_index: str = ""                # or these input views: indices into the scene's views, comma-separated
    seed: int = 0                        # every random draw of scene i (input views, NeRF, noise) from seed + i
    resize_mode: str = "upstream"        # cameras of resized frames: 'upstream' (one nominal scale, a quirk) or
                                         # 'exact' (per-axis scales; docs/data.md); not for co3d_toy

    # models (''= the default location: checkpoints/sf/{category}/..., checkpoints/sd/sd-v1-3-vae.ckpt)
    eft: str = ""                        # EFT checkpoint (-e)
    vldm: str = ""                       # VLDM checkpoint (-l)
    vae: str = ""                        # VAE checkpoint (-a)
    vgg_weights: str = ""                # ImageNet VGG16 weights for LPIPS when the torch hub cache has none
    image_size: int = 0                  # image side; 0 = the models' (VLDM latent size × VAE stride)

    # how
    baselines: bool = False              # also score the EFT images, VLDM samples and nearest input views
    unet: str = "graph"                  # UNet on CUDA: 'eager' fp32 as upstream; 'graph' bf16 + CUDA graph;
                                         # 'compile' adds torch.compile
    precision: str = "fp32"              # 'bf16': autocast of the EFT cache and the eager UNet (VAE, LPIPS stay fp32)
    eft_mode: str = "upstream"           # EFT BatchNorm batch statistics + dropout as upstream, or 'eval'
    high_noise: str = "upstream"         # guidance noise levels ≥ 0.99: PLMS from t = 1 on the clean latent, as
                                         # upstream, or 'noised': from the noised one (docs/vldm.md)
    plms_steps: int = 0                  # PLMS steps from t = 1 (the guidance runs t·2× that, at most all);
                                         # 0 = the VLDM checkpoint's (upstream's: 50)
    scenes_at_once: int = 1              # scenes distilled at once on each GPU, their models' calls batched and
                                         # their NeRFs stacked (docs/demo.md); 1 = one scene at a time
    gpus: int = 1                        # processes, one GPU each (-g)
    port: int = 1                        # last digit of the DDP port 1234p (-p)

    # outputs
    output: str = "output/demo"          # output folder (-o)
    skip_done: bool = False              # skip scenes whose outputs an earlier run completed (metrics/{seq}.json)
    mesh_threshold: float = 10.0         # density threshold of the exported mesh
    mesh_resolution: int = 256           # marching-cubes grid size of the mesh

    custom: CustomOptions = field(default_factory=CustomOptions)  # how -d custom reads its folder (docs/data.md)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    @property
    def dataset_root(self):
        return self.root or f"data/{self.dataset_name}"

    @property
    def categories(self):
        return expand_categories(self.category)

    @property
    def chosen_inputs(self):
        """Return (names, indices): input_names and input_index as lists, [] where not given."""
        return [n.strip() for n in self.input_names.split(",") if n.strip()], parse_index_list(self.input_index, "input_index", "0,4")


def parse_indices(text):
    """Return the scene indices of -i, e.g. '0,5,7' -> [0, 5, 7]."""
    indices = parse_index_list(text, "-i/--idx", "0,5,7")
    if not indices:
        raise UserError("-i/--idx is empty; give scene indices such as 0,5,7")
    return indices


def demo_config_problems(config):
    """Return one line for every setting that cannot work, each naming a value that can."""
    choices = {"dataset_name": SCENE_SOURCES, "unet": UNET_MODES, "eft_mode": EFT_MODES, "precision": PRECISIONS,
               "resize_mode": RESIZE_MODES, "high_noise": HIGH_NOISE_STARTS, "distill.method": METHODS}
    problems = problems_of(*[lambda name=name, allowed=allowed: check_choice(name, attrgetter(name)(config), allowed,
                                                                             UserError)
                             for name, allowed in choices.items()])
    if config.input_views < 1:
        problems.append(f"-v/--input_views must be at least 1, got {config.input_views}; e.g. -v 2")
    if config.input_names and config.input_index:
        problems.append("give the input views by input_names or by input_index, not both")
    distill, render = config.distill, config.distill.nerf_render
    at_least_one = {"--iterations": distill.iterations, "--train_rays": distill.train_rays,
                    "--num_steps": render.num_steps, "--turntable_frames": distill.turntable_frames,
                    "distill.log_every": distill.log_every, "--mesh_resolution": config.mesh_resolution}
    problems += [f"{flag} must be at least 1, got {value}" for flag, value in at_least_one.items() if value < 1]
    problems += [f"{flag} must be 0 or more, got {value}" for flag, value in
                 (("--upsample_steps", render.upsample_steps), ("--circle_cameras", distill.circle_cameras),
                  ("--image_size", config.image_size), ("plms_steps", config.plms_steps)) if value < 0]
    if not 0 < distill.noise_level_scale <= 1:
        problems.append(f"distill.noise_level_scale must be in (0, 1], got {distill.noise_level_scale}; "
                        "e.g. distill.noise_level_scale=1 (upstream's noise levels)")
    if distill.views_per_step < 1:
        problems.append(f"distill.views_per_step must be at least 1, got {distill.views_per_step}; "
                        "e.g. distill.views_per_step=1 (upstream's one camera per fusion step)")
    if config.scenes_at_once < 1:
        problems.append(f"--scenes_at_once must be at least 1, got {config.scenes_at_once}; e.g. --scenes_at_once 1 "
                        "(one scene at a time)")
    if config.scenes_at_once > 1 and distill.nerf.grid_backend == "tcnn":
        problems.append("--scenes_at_once above 1 needs one grid-encoder call over several scenes' grids, which the "
                        "tcnn backend cannot make; use distill.nerf.grid_backend=auto (Triton on a GPU)")
    if config.image_size > 0 and distill.train_rays >= 1 and config.image_size % distill.train_rays:
        problems.append(train_rays_problem(distill.train_rays, config.image_size, "--image_size"))
    problems += problems_of(lambda: parse_index_list(config.input_index, "input_index", "0,4"),
                            lambda: check_custom_options(config.custom), lambda: parse_indices(config.idx),
                            lambda: check_port(config.port))
    if config.dataset_name != "synthetic":
        unknown = [c for c in config.categories if c not in CO3D_ALL_CATEGORIES]
        if unknown:
            problems.append(f"unknown category {unknown[0]!r}; use one of CO3D's: {', '.join(CO3D_ALL_CATEGORIES)}, "
                            f"'all_ten' or 'all'")
    return problems


def train_rays_problem(train_rays, image_size, size_source):
    """Return the line saying train_rays must divide the image size, naming the largest value that does."""
    fitting = max(d for d in range(1, min(train_rays, image_size) + 1) if image_size % d == 0)
    return f"--train_rays {train_rays} must divide {size_source} {image_size}; e.g. --train_rays {fitting}"


def check_demo_config(config):
    """Raise one UserError naming every setting that cannot work."""
    raise_problems(demo_config_problems(config))


def load_demo_config(path=None, overrides=(), **flags):
    """Return the DemoConfig of the defaults, then a YAML file, then flags (dotted names), then key=value overrides."""
    config = load_layered(DemoConfig, path, overrides, flags, what="demo config")
    check_demo_config(config)
    return config


def with_image_size(config, image_size, latent_stride):
    """Return config with the models' image size applied to the distillation and the EFT feature grid.

    UserError if the config asked for another size than the models were trained at.
    """
    if config.image_size and config.image_size != image_size:
        raise UserError(f"--image_size {config.image_size} does not match the models, which work at {image_size} "
                        f"(VLDM latents × VAE stride {latent_stride}); leave image_size at 0 to follow the models")
    if image_size % config.distill.train_rays:
        raise UserError(train_rays_problem(config.distill.train_rays, image_size, "the models' image size"))
    distill = config.distill
    features = replace(distill.features, image_size=image_size, scale=latent_stride, mode=config.eft_mode,
                       precision=config.precision)
    distill = replace(distill, image_size=image_size, precision=config.precision, features=features,
                      perceptual_start=min(distill.perceptual_start, distill.fusion_start))
    return replace(config, image_size=image_size, distill=distill)

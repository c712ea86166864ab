"""Datasets: CO3Dv2 on disk, upstream's toy files, and a synthetic CO3Dv2-format generator.

    from sparsefusion.data import load_dataset
    dataset = load_dataset("co3d", "data/co3d", "hydrant")   # upstream's demo loader: fewview_dev, test, 32 views
    scene = dataset[0]                                         # a Scene (scene.py)
"""

from pathlib import Path

from sparsefusion.data.categories import CATEGORY_GROUPS, CO3D_ALL_CATEGORIES, CO3D_ALL_TEN, expand_categories
from sparsefusion.data.co3d import CO3DConfig, CO3DDataset
from sparsefusion.data.custom import CustomConfig, CustomDataset, CustomOptions
from sparsefusion.data.scene import Scene
from sparsefusion.data.toy import ToyDataset
from sparsefusion.errors import UserError

DATASET_NAMES = ("co3d", "co3d_toy", "synthetic")       # what train.py trains on
SCENE_SOURCES = DATASET_NAMES + ("custom",)             # what demo.py reconstructs: also your own scene folder


def load_dataset(name, root, category, subset="fewview_dev", split="test", sample_batch_size=32, **options):
    """Return a dataset of Scenes: 'co3d' and 'synthetic' read the CO3Dv2 layout, 'co3d_toy' upstream's toy files.

    Args:
        name: 'co3d' | 'co3d_toy' | 'synthetic' (a root written by python -m sparsefusion.data.synthetic) |
            'custom' (a folder of your own images and cameras, custom.py).
        root: the dataset folder.
        category: a category, a group ('all_ten', 'all') or a list; groups are pooled into one dataset.
            For 'custom', the label of its scenes.
        subset, split, sample_batch_size: which set list, which part of it, how many views per scene
            (defaults: upstream's demo; its train.py uses 'fewview_train', 'train', 10). Toy files
            hold fixed scenes and ignore these, as do custom folders (their views: max_views).
        options: further CO3DConfig fields (image_size, box_crop_context, resize_mode, ...), or
            CustomConfig fields for 'custom' (cameras, masks, normalize, camera_distance, max_views, ...).
    """
    if name not in SCENE_SOURCES:
        raise UserError(f"unknown dataset {name!r}; choose from {list(SCENE_SOURCES)}")
    if name == "co3d_toy":
        return ToyDataset(root, category)
    if name == "custom":
        try:
            return CustomDataset(CustomConfig(root=str(root), category=category, **options))
        except TypeError as err:
            raise UserError(f"unknown custom scene option ({err}); options are the fields of CustomConfig") from err
    try:
        config = CO3DConfig(root=str(root), category=category, subset=subset, split=split,
                            sample_batch_size=sample_batch_size, **options)
    except TypeError as err:
        raise UserError(f"unknown dataset option ({err}); options are the fields of CO3DConfig") from err
    if name == "synthetic":
        missing = [c for c in expand_categories(category) if not (Path(root) / c / "frame_annotations.jgz").is_file()]
        if missing:
            raise UserError(f"no synthetic data for {missing} under {root}; generate it first: "
                            f"python -m sparsefusion.data.synthetic --root {root} --categories {' '.join(missing)}")
    return CO3DDataset(config)


__all__ = ["load_dataset", "Scene", "CO3DConfig", "CO3DDataset", "ToyDataset", "CustomConfig", "CustomDataset",
           "CustomOptions", "DATASET_NAMES", "SCENE_SOURCES",
           "CO3D_ALL_CATEGORIES", "CO3D_ALL_TEN", "CATEGORY_GROUPS", "expand_categories"]

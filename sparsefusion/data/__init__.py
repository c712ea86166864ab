"""Datasets: CO3Dv2 on disk, upstream's toy files, and a synthetic CO3Dv2-format generator.

    from sparsefusion.data import load_dataset
    dataset = load_dataset("co3d", "data/co3d", "hydrant")   # upstream's demo loader: fewview_dev, test, 32 views
    scene = dataset[0]                                         # a Scene (scene.py)
"""

from pathlib import Path

from sparsefusion.data.categories import CATEGORY_GROUPS, CO3D_ALL_CATEGORIES, CO3D_ALL_TEN, expand_categories
from sparsefusion.data.co3d import CO3DConfig, CO3DDataset
from sparsefusion.data.scene import Scene
from sparsefusion.data.toy import ToyDataset
from sparsefusion.errors import UserError

DATASET_NAMES = ("co3d", "co3d_toy", "synthetic")


def load_dataset(name, root, category, subset="fewview_dev", split="test", sample_batch_size=32, **options):
    """Return a dataset of Scenes: 'co3d' and 'synthetic' read the CO3Dv2 layout, 'co3d_toy' upstream's toy files.

    Args:
        name: 'co3d' | 'co3d_toy' | 'synthetic' (a root written by python -m sparsefusion.data.synthetic).
        root: the dataset folder.
        category: a category, a group ('all_ten', 'all') or a list; groups are pooled into one dataset.
        subset, split, sample_batch_size: which set list, which part of it, how many views per scene
            (defaults: upstream's demo; its train.py uses 'fewview_train', 'train', 10). Toy files
            hold fixed scenes and ignore these.
        options: further CO3DConfig fields (image_size, box_crop_context, resize_mode, ...).
    """
    if name not in DATASET_NAMES:
        raise UserError(f"unknown dataset {name!r}; choose from {list(DATASET_NAMES)}")
    if name == "co3d_toy":
        return ToyDataset(root, category)
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


__all__ = ["load_dataset", "Scene", "CO3DConfig", "CO3DDataset", "ToyDataset", "DATASET_NAMES",
           "CO3D_ALL_CATEGORIES", "CO3D_ALL_TEN", "CATEGORY_GROUPS", "expand_categories"]

"""Upstream's toy format: {root}/{category}/{category}_toy.pt holding {category: [scene dict, ...]}.

Each scene dict has upstream's per-scene keys (CO3Dv2Wrapper's output with masked=False): R, T, f,
c, image_size, images, masks, valid_region, and optionally bbox, idx, frame_type, images_full.
"""

from pathlib import Path

import torch

from sparsefusion.checkpoint import load_file, save_atomic
from sparsefusion.data.categories import expand_categories
from sparsefusion.data.scene import Scene
from sparsefusion.errors import UserError

TOY_LAYOUT = ("expected upstream's toy layout: {root}/{category}/{category}_toy.pt holding {category: [scene dicts]}; "
              "download the toy CO3Dv2 set (6.7 GB) linked in upstream's README (Google Drive) into data/co3d_toy/")
TOY_SOURCE = "upstream's toy CO3Dv2 set (see the README), or write one with sparsefusion.data.toy.save_toy"


def toy_path(root, category):
    """Return the path of a category's toy file: {root}/{category}/{category}_toy.pt."""
    return Path(root) / category / f"{category}_toy.pt"


def read_toy_scenes(root, category):
    """Return the list of scene dicts in a category's toy file; a missing or malformed file raises UserError."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset root not found: {root}; {TOY_LAYOUT}")
    path = toy_path(root, category)
    if not path.is_file():
        present = sorted(p.parent.name for p in root.glob("*/*_toy.pt"))
        raise UserError(f"toy file not found: {path} (categories under {root}: {present or 'none'}); {TOY_LAYOUT}")
    content = load_file(path, "toy dataset", where_to_get=TOY_SOURCE)
    if not isinstance(content, dict) or category not in content:
        keys = list(content) if isinstance(content, dict) else type(content).__name__
        raise UserError(f"toy file {path} must hold {{'{category}': [scene dicts]}}, found {keys}; {TOY_LAYOUT}")
    scenes = content[category]
    if not isinstance(scenes, (list, tuple)) or not all(isinstance(s, dict) for s in scenes):
        raise UserError(f"toy file {path}: '{category}' must be a list of scene dicts; {TOY_LAYOUT}")
    return list(scenes)


class ToyDataset(torch.utils.data.Dataset):
    """Scenes of upstream's toy files, in file order; dataset[i] is a Scene."""

    def __init__(self, root, category):
        self.root = Path(root)
        self.entries = []  # (category, scene dict)
        for name in expand_categories(category):
            self.entries.extend((name, scene) for scene in read_toy_scenes(root, name))
        # check every scene now, so a malformed file fails at start, not mid-run
        self.scenes = [self._to_scene(i) for i in range(len(self.entries))]

    def _to_scene(self, index):
        category, data = self.entries[index]
        where = f"{toy_path(self.root, category)} scene {index}"
        return Scene.from_dict(data, category, sequence_name=f"{category}_{index:03d}", where=where)

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise UserError(f"scene index {index} is out of range: {len(self)} toy scenes under {self.root}")
        return self.scenes[index]


def save_toy(root, category, scenes):
    """Write scenes as {root}/{category}/{category}_toy.pt in upstream's toy format; return the path."""
    return save_atomic({category: [scene.to("cpu").to_dict() for scene in scenes]}, toy_path(root, category))

"""Checkpoint files: safe loading, strict state-dict checks, atomic saving."""

import dataclasses
import re
from pathlib import Path

import torch

from sparsefusion.errors import UserError
from sparsefusion.outputs import atomic_path


def load_file(path, what, where_to_get=None, map_location="cpu", safe_globals=()):
    """Return the object in a torch checkpoint file, loaded with weights_only=True.

    Args:
        path: the file.
        what: a few words naming the file's role, used in errors ("EFT checkpoint").
        where_to_get: where a user finds the file, appended to the missing-file error.
        safe_globals: extra classes a weights_only load may admit (see torch.serialization).
    """
    path = Path(path)
    if not path.is_file():
        hint = f"; get it from {where_to_get}" if where_to_get else ""
        raise UserError(f"{what} not found at {path}{hint}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file: name it, keep the cause
        raise UserError(f"{what} at {path} could not be read: {load_failure(err)}") from err


def load_failure(err):
    """Return one line saying why torch.load refused a file: a pickled object that is not a tensor, or corruption."""
    text = str(err)
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return (f"it holds a pickled object ({unsafe.group(1)}) besides tensors, refused as unsafe; "
                f"is it a checkpoint of this project?")
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return f"truncated, corrupt or not a checkpoint ({type(err).__name__}: {first_line})"


def state_dict_mismatches(expected, given):
    """Return (missing, unexpected, mis-shaped) key lists between two state dicts.

    mis-shaped entries read "key: expected (a, b), got (c, d)".
    """
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = [
        f"{key}: expected {tuple(expected[key].shape)}, got {tuple(given[key].shape)}"
        for key in sorted(set(expected) & set(given))
        if tuple(expected[key].shape) != tuple(given[key].shape)
    ]
    return missing, unexpected, misshaped


def _listing(label, keys, limit=8):
    shown = ", ".join(keys[:limit]) + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{len(keys)} {label} [{shown}]"


def load_state_dict_strict(module, state_dict, what):
    """Load state_dict into module; any missing, unexpected or mis-shaped key raises UserError naming them."""
    missing, unexpected, misshaped = state_dict_mismatches(module.state_dict(), state_dict)
    if missing or unexpected or misshaped:
        parts = [
            _listing(label, keys)
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if keys
        ]
        raise UserError(f"{what} does not match {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)
    return module


def save_atomic(obj, path):
    """torch.save obj to path through a temporary file in the same folder, renamed when complete."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def config_to_dict(config):
    """Return a dataclass config as plain dicts, lists and scalars, to store under a checkpoint's 'config' key."""
    return dataclasses.asdict(config)


def config_from_dict(cls, data):
    """Return the dataclass cls built from config_to_dict's output; nested dataclass fields are rebuilt too.

    Unknown keys are a UserError naming them (a checkpoint from another version or model).
    """
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UserError(f"stored {cls.__name__} has unknown fields {unknown}")
    values = {}
    for name, value in data.items():
        default = names[name].default_factory() if names[name].default_factory is not dataclasses.MISSING else names[name].default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = config_from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def stored_config(checkpoint, cls, given=None):
    """Return given, else the config stored in checkpoint['config'], else cls's defaults (upstream's)."""
    if given is not None:
        return given
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), dict):
        return config_from_dict(cls, checkpoint["config"])
    return cls()

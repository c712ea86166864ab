"""Checkpoint files: safe loading, checksums, strict state-dict checks, atomic saving, the training layout.

Loading is torch.load(weights_only=True), whose refusal of code-running pickles holds from PyTorch
2.10 on (CVE-2025-32434 bypassed it up to 2.5.1, a later advisory was fixed in 2.10); older versions
are refused. Our own checkpoints carry a 'checksum' of their content, verified on load; released
files have none and load as they are.
"""

import dataclasses
import hashlib
import re
from pathlib import Path

import torch

from sparsefusion.atomic_files import atomic_path
from sparsefusion.errors import UserError

SAFE_LOADING_TORCH = (2, 10)  # the first PyTorch without a known weights_only bypass
CHECKSUM_KEY = "checksum"
TRAINING_KEYS = ("step", "optimizer_state_dict", "scheduler_state_dict")  # what resuming needs beyond the weights


def file_problem(path, what, where_to_get=None):
    """Return why path is no file to load (missing, a folder) as one line naming the fix, or None."""
    path = Path(path)
    if path.is_dir():
        return f"{what} {path} is a folder, not a file; pass the checkpoint file inside it"
    if not path.is_file():
        hint = f"; get it from {where_to_get}" if where_to_get else ""
        return f"{what} not found at {path}{hint}"
    return None


def torch_version():
    """Return the running PyTorch's (major, minor)."""
    return tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])


def load_file(path, what, where_to_get=None, map_location="cpu", safe_globals=()):
    """Return the object in a torch checkpoint file, loaded with weights_only=True, its checksum verified.

    Args:
        path: the file.
        what: a few words naming the file's role, used in errors ("EFT checkpoint").
        where_to_get: where a user finds the file, appended to the missing-file error.
        safe_globals: extra classes a weights_only load may admit (see torch.serialization).
    """
    path = Path(path)
    problem = file_problem(path, what, where_to_get)
    if problem:
        raise UserError(problem)
    if torch_version() < SAFE_LOADING_TORCH:
        raise UserError(f"PyTorch {torch.__version__} can be made to run code by a crafted checkpoint "
                        f"(weights_only=True is bypassable before {'.'.join(map(str, SAFE_LOADING_TORCH))}); "
                        f"upgrade: pip install 'torch>={'.'.join(map(str, SAFE_LOADING_TORCH))}'")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file: name it, keep the cause
        raise UserError(f"{what} at {path} could not be read: {load_failure(err)}") from err
    if isinstance(content, dict) and CHECKSUM_KEY in content:
        if content[CHECKSUM_KEY] != content_checksum(without_checksum(content)):
            raise UserError(f"{what} at {path} is corrupt: its content does not match the checksum stored in it "
                            f"(a damaged copy or disk); restore the file from a good copy")
    return content


def load_failure(err):
    """Return one line saying why torch.load refused a file: a pickled object that is not a tensor, or corruption."""
    text = str(err)
    # PyTorch words it "Unsupported global: GLOBAL x" or "unsupported GLOBAL x whose module ..." by version
    unsafe = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if unsafe or "Weights only load failed" in text:
        what = f" ({unsafe.group(1)})" if unsafe else ""
        return (f"it holds a pickled object{what} besides tensors, refused as unsafe; "
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
    """torch.save obj to path whole or not at all; a dict gets a 'checksum' of its content. Returns the path."""
    if isinstance(obj, dict):
        content = without_checksum(obj)
        obj = {**content, CHECKSUM_KEY: content_checksum(content)}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def without_checksum(checkpoint):
    """Return a checkpoint dict without its 'checksum' entry."""
    return {key: value for key, value in checkpoint.items() if key != CHECKSUM_KEY}


def content_checksum(obj):
    """Return 'sha256:<hex>' of a checkpoint's content: every tensor's dtype, shape and bytes, every other value's
    repr, dicts in their (saved and loaded alike) key order."""
    digest = hashlib.sha256()
    _digest_into(digest, obj)
    return "sha256:" + digest.hexdigest()


def _digest_into(digest, obj):
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        digest.update(f"dict {len(obj)}|".encode())
        for key, value in obj.items():
            digest.update(f"{key!r}:".encode())
            _digest_into(digest, value)
    elif isinstance(obj, (list, tuple)):  # pickling keeps the type, but a list and a tuple hold the same content
        digest.update(f"list {len(obj)}|".encode())
        for value in obj:
            _digest_into(digest, value)
    else:
        digest.update(f"{type(obj).__name__} {obj!r}|".encode())


def model_checkpoint(module, step=0, optimizer=None, scheduler=None):
    """Return upstream train.py's checkpoint of a model, {'step', 'model_state_dict'[, 'optimizer_state_dict',
    'scheduler_state_dict']}, plus our 'config': the module's architecture, so that it reloads without flags."""
    checkpoint = {"step": step, "model_state_dict": module.state_dict()}
    if optimizer is not None:
        checkpoint.update(optimizer_state_dict=optimizer.state_dict(), scheduler_state_dict=scheduler.state_dict())
    return {**checkpoint, "config": config_to_dict(module.config)}


def load_training_state(module, checkpoint, optimizer, scheduler, what, weights_key="model_state_dict"):
    """Load a training checkpoint's weights (strictly), optimizer and scheduler state into module and its optimizer."""
    load_state_dict_strict(module, checkpoint[weights_key], what)
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    scheduler.load_state_dict(checkpoint["scheduler_state_dict"])


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

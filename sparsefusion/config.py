"""One way to configure every script: a dataclass's defaults, then a YAML file, then flags, then key=value.

train.py (TrainConfig) and demo.py (DemoConfig) both build their configuration with load_layered;
nested fields are dotted (distill.iterations=500), and an unknown key or a wrong type is a UserError
naming it. check_choice is the one check of a mode string against its choices, for every module.
"""

from dataclasses import fields, is_dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparsefusion.errors import UserError


def nested(dotted):
    """Return {'a.b': v} as {'a': {'b': v}}: flags given under dotted field names."""
    tree = {}
    for name, value in dotted.items():
        *parents, leaf = name.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def load_layered(cls, path=None, overrides=(), flags=None, what="config"):
    """Return cls from its defaults, then the YAML file at path, then flags {dotted name: value}, then
    key=value overrides; UserError for a missing file, an unknown key, a wrong type or no category."""
    try:
        merged = OmegaConf.structured(cls)
        if path:
            if not Path(path).is_file():
                raise UserError(f"config file {path} not found")
            merged = OmegaConf.merge(merged, read_yaml(path))
        merged = OmegaConf.merge(merged, OmegaConf.create(nested(flags or {})),
                                 OmegaConf.from_dotlist(list(overrides)))
        if OmegaConf.is_missing(merged, "category"):
            raise UserError("no category given: pass -c CATEGORY (or category=... / a YAML config)")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f" at '{key}'" if key else ""
        raise UserError(f"bad {what}{where}: {str(err).splitlines()[0]}; keys are the fields of "
                        f"{cls.__module__}.{cls.__name__}") from err
    except ValueError as err:  # a nested config's own check in its __post_init__
        raise UserError(f"bad {what}: {err}") from err


def read_yaml(path):
    """Return the OmegaConf of a YAML file; UserError naming the file and the line where it stops parsing."""
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {path} is not valid YAML{where}: {problem}; fix it there") from err


def parse_index_list(text, flag, example):
    """Return the non-negative integers of a comma-separated flag value ('' -> []), e.g. '0,5,7' -> [0, 5, 7]."""
    try:
        indices = [int(part) for part in str(text).split(",")] if str(text).strip() else []
    except ValueError:
        raise UserError(f"{flag} {text!r} is invalid; use comma-separated indices such as {example}") from None
    if any(i < 0 for i in indices):
        raise UserError(f"{flag} {text!r} has a negative index; indices start at 0")
    return indices


def check_choice(name, value, choices, error=ValueError):
    """Return value if it is one of choices, else raise error (ValueError, or UserError for a user's setting) listing them."""
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def field_help(cls, prefix=""):
    """Return '  name = default' lines for every field of a config dataclass, nested ones dotted (for --help)."""
    lines = []
    for item in fields(cls):
        default = item.default_factory() if callable(item.default_factory) else item.default
        if is_dataclass(default):
            lines += field_help(type(default), f"{prefix}{item.name}.")
        else:
            lines.append(f"  {prefix}{item.name} = {default!r}")
    return lines

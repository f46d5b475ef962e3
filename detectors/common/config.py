"""Dataclass configs filled by argparse, optionally from a YAML file (``yaml.safe_load``)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

__all__ = ["parse_config"]


def _type_of(field: dataclasses.Field):
    t = (
        field.type
        if isinstance(field.type, str)
        else getattr(field.type, "__name__", str(field.type))
    )
    if "bool" in t:
        return None
    if "float" in t:
        return float
    if "int" in t:
        return int
    return str


def _check_preset(cls, values: dict, p: argparse.ArgumentParser) -> None:
    """A config class with ``PRESETS`` (name -> {field: value or function of the config}) and a
    ``preset`` field: a field given explicitly (file or command line) that the chosen preset sets
    to another value is an error, never silently overridden."""
    presets = getattr(cls, "PRESETS", None)
    name = values.get("preset")
    if not presets or not name or name not in presets:
        return
    for key, value in presets[name].items():
        if key in values and (callable(value) or values[key] != value):
            flag = "--" + key.replace("_", "-")
            what = f"derives {flag}" if callable(value) else f"sets {flag} to {value!r}"
            p.error(f"--preset {name} {what}: drop {flag} {values[key]!r} or the preset")


def parse_config(cls, argv=None, description: str = ""):
    """Build ``cls`` (a dataclass) from ``--config file.yaml`` and the command line; the command
    line wins. Field ``foo_bar`` is ``--foo-bar``; bools are ``--foo`` / ``--no-foo``."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--config", type=Path, help="YAML file of defaults (keys as field names)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind = _type_of(f)
        if kind is None:
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (default: {f.default})",
            )
        else:
            p.add_argument(
                flag,
                type=kind,
                default=None,
                help=f"{help_text} (default: {f.default})",
                **({"choices": f.metadata["choices"]} if "choices" in f.metadata else {}),
            )
    args = p.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config is not None:
        import yaml

        try:
            loaded = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            p.error(f"--config {args.config}: {exc}")
        if not isinstance(loaded, dict):
            p.error(f"--config {args.config}: expected a mapping of field names to values")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(loaded) - names)
        if unknown:
            p.error(f"--config {args.config}: unknown keys {unknown}")
        values.update(loaded)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    _check_preset(cls, values, p)
    for key in ("tau1", "tau2"):
        if key in values and isinstance(values[key], str) and values[key] in ("inf", "infinity"):
            values[key] = math.inf
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        p.error(str(exc))

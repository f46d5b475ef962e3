"""Dataclass configs filled by argparse, optionally from a YAML file (``yaml.safe_load``), and
the config every bundled detector's run reads (:class:`TrainConfig`).

Every value, from the command line or the file, gets the field's type and choices checked the
same way; a field given neither way keeps its default. Errors are argparse errors (one line,
exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RESUME_FREE",
    "OneLineParser",
    "TrainConfig",
    "chosen_options",
    "flag",
    "parse_config",
]

_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def field_type(field: dataclasses.Field) -> tuple[type, bool]:
    """``(bool | int | float | str, optional)`` of a config field from its annotation."""
    text = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    parts = [p.strip() for p in str(text).split("|")]
    optional = "None" in parts
    names = [p for p in parts if p != "None"]
    if len(names) != 1 or names[0] not in _TYPES:
        raise TypeError(f"config field {field.name}: unsupported type {text!r}")
    return _TYPES[names[0]], optional


def flag(name: str) -> str:
    """The command-line flag of a config field (``batch_size`` -> ``--batch-size``)."""
    return "--" + name.replace("_", "-")


def convert(field: dataclasses.Field, value: Any, where: str) -> Any:
    """``value`` (from YAML, or a string from the command line) as the field's type, or a
    ``ValueError`` naming the field, what was expected and what was received."""
    kind, optional = field_type(field)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where} must be a {kind.__name__}, got null")
    bad = ValueError(f"{where} must be {_expected(kind)}, got {value!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise bad
        try:
            value = int(value)
        except ValueError:
            raise bad from None
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise bad
        try:
            value = float(value)  # YAML 1.1 reads 1e-4 as a string; "inf" too
        except ValueError:
            raise bad from None
        if math.isnan(value):
            raise bad
    elif not isinstance(value, str):
        raise bad
    choices = field.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{where} must be one of {list(choices)}, got {value!r}")
    return value


def _expected(kind: type) -> str:
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
    }[kind]


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
            given = flag(key)
            what = f"derives {given}" if callable(value) else f"sets {given} to {value!r}"
            p.error(f"--preset {name} {what}: drop {given} {values[key]!r} or the preset")


def _default_text(f: dataclasses.Field) -> str:
    if f.metadata.get("default_help"):
        return f.metadata["default_help"]
    d = f.default
    if d is None:
        return "not set"
    if isinstance(d, bool):
        return "on" if d else "off"
    if d == "":
        return "none"
    return str(d)


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: PROG: message (see --help)`` and exit status 2,
    without the usage block (it is what ``--help`` is for)."""

    def error(self, message: str):
        sys.stderr.write(f"error: {self.prog}: {message} (see --help)\n")
        raise SystemExit(2)


def _yaml_error(exc: Exception) -> str:
    """A YAML error on one line: what, and where (line, column)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"not valid YAML ({problem}{where})"


def parse_config(cls, argv=None, description: str = "", prog: str | None = None):
    """Build ``cls`` (a dataclass) from ``--config file.yaml`` and the command line; the command
    line wins. Field ``foo_bar`` is ``--foo-bar``; bools are ``--foo`` / ``--no-foo``. ``prog``
    names the command in usage lines (e.g. ``python -m detectors.fcos.train``)."""
    p = OneLineParser(description=description, prog=prog)
    p.add_argument("--config", type=Path, help="YAML file of defaults (keys as field names)")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for f in fields.values():
        kind, _ = field_type(f)
        help_text = f.metadata.get("help", f.name.replace("_", " "))
        help_text = f"{help_text} (default: {_default_text(f)})"
        if kind is bool:
            p.add_argument(
                flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            metavar = f.metadata.get("metavar", f.name.upper())
            choices = f.metadata.get("choices")
            if choices is not None:
                metavar = "{" + ",".join(str(c) for c in choices if c != "") + "}"
            p.add_argument(flag(f.name), type=str, default=None, help=help_text, metavar=metavar)
    args = p.parse_args(argv)
    values: dict[str, Any] = {}
    try:
        if args.config is not None:
            import yaml

            try:
                loaded = yaml.safe_load(args.config.read_text()) or {}
            except OSError as exc:
                p.error(f"--config {args.config}: {exc.strerror or exc}")
            except yaml.YAMLError as exc:
                p.error(f"--config {args.config}: {_yaml_error(exc)}")
            if not isinstance(loaded, dict):
                p.error(f"--config {args.config}: expected a mapping of field names to values")
            unknown = sorted(set(loaded) - set(fields))
            if unknown:
                p.error(f"--config {args.config}: unknown keys {unknown}")
            for key, value in loaded.items():
                where = f"--config {args.config}: {key}"
                values[key] = convert(fields[key], value, where)
        for name, f in fields.items():
            v = getattr(args, name)
            if v is not None:
                values[name] = convert(f, v, flag(name))
    except ValueError as exc:
        p.error(str(exc))
    _check_preset(cls, values, p)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        p.error(str(exc))


# -- the fields every bundled detector's run reads ------------------------------------------------


@dataclass
class TrainConfig:
    """What every bundled detector's training run reads (``--flag`` per field)."""

    data: str = field(default="", metadata={"help": "COCO-format dataset directory"})
    out: str = field(default="runs/train", metadata={"help": "output directory"})
    epochs: int = field(default=12, metadata={"help": "training epochs"})
    batch_size: int = field(default=8, metadata={"help": "images per step per process"})
    lr: float = field(default=0.01, metadata={"help": "learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay"})
    warmup_iters: int = field(default=100, metadata={"help": "linear warm-up iterations"})
    clip_grad: float = field(default=10.0, metadata={"help": "max gradient norm (0: off)"})
    depth: int = field(default=18, metadata={"help": "ResNet depth", "choices": (18, 34, 50)})
    backbone_weights: str = field(
        default="", metadata={"help": "a local torchvision ResNet checkpoint to start from"}
    )
    freeze_at: int = field(
        default=0, metadata={"help": "freeze the stem (1) and stages (2..5)", "metavar": "0..5"}
    )
    short: int = field(default=128, metadata={"help": "resize the short side to this"})
    max_size: int = field(default=128, metadata={"help": "cap on the long side"})
    amp: bool = field(default=True, metadata={"help": "mixed precision (CUDA only)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    workers: int = field(default=0, metadata={"help": "data-loading workers"})
    eval_every: int = field(default=1, metadata={"help": "evaluate every N epochs (0: at end)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out"})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "replace the run in --out (its checkpoint and log), once this run has "
            "checked its inputs and written its first checkpoint"
        },
    )
    accept_changes: bool = field(
        default=False,
        metadata={
            "help": "with --resume: continue with settings that differ from the run's (each "
            "change is recorded in metrics.jsonl)"
        },
    )
    progress: bool = field(
        default=True, metadata={"help": "a live progress bar (on a terminal only)"}
    )

    def __post_init__(self):
        if not self.data:
            raise ValueError("--data is required (a COCO-format dataset directory)")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("eval_every", "workers", "warmup_iters"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        if not 0 <= self.freeze_at <= 5:
            raise ValueError(f"--freeze-at must be in 0..5, got {self.freeze_at}")
        if self.lr <= 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError("--lr must be > 0, --clip-grad and --weight-decay >= 0")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.resume and self.overwrite:
            raise ValueError(
                "--resume continues the run in --out, --overwrite replaces it: pick one"
            )

    @classmethod
    def upgrade(cls, stored: dict) -> dict:
        """A checkpoint's stored config as this version's fields (subclasses map renamed ones)."""
        return {"overwrite": False, "accept_changes": False, **stored}

    def recorded(self) -> dict:
        """What every line of ``metrics.jsonl`` records of the run's settings (subclasses: the
        assigner or matcher and its options)."""
        return {}


#: Settings a resumed run may change freely (where the data and output live, how long, how
#: often to evaluate, how to run); any other change is refused unless ``--accept-changes``.
RESUME_FREE = frozenset(
    {
        "data",
        "out",
        "epochs",
        "eval_every",
        "workers",
        "device",
        "resume",
        "overwrite",
        "accept_changes",
        "progress",
    }
)


def chosen_options(cfg, fields: tuple[str, ...], role: str, name: str, cls: type) -> dict:
    """The fields of ``cfg`` among ``fields`` that were given (not None), each an option of
    ``cls`` (the ``--{role} {name}`` assigner or matcher class); a given field that ``cls`` does
    not take is a ``ValueError`` naming its flag and the flags that do apply."""
    from uotmatch.detection import options_of

    given = {n: getattr(cfg, n) for n in fields if getattr(cfg, n) is not None}
    takes = options_of(cls)
    wrong = [n for n in given if n not in takes]
    if wrong:
        flags = ", ".join(flag(n) for n in fields if n in takes)
        raise ValueError(
            f"{flag(wrong[0])} does not apply to --{role} {name} (its options here: "
            f"{flags or 'none'})"
        )
    return given

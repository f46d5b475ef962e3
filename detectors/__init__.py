"""Bundled detectors (FCOS-OTA, DETR) that train with :mod:`uotmatch` assignment.

They need the ``detectors`` extra (torchvision, an evaluator, Pillow, tqdm, PyYAML): from a
clone, ``pip install -e '.[detectors]'``. Without it, ``python -m detectors...`` says so in one
line instead of a ``ModuleNotFoundError`` traceback.
"""

import importlib.util as _util
import sys as _sys

#: The modules the bundled detectors import, and the package that provides each.
_NEEDS = {"torchvision": "torchvision", "PIL": "pillow", "tqdm": "tqdm", "yaml": "pyyaml"}


def _absent(module: str) -> bool:
    try:
        return _util.find_spec(module) is None
    except (ImportError, ValueError):  # a module set to None in sys.modules: not importable
        return True


_missing = [pkg for module, pkg in _NEEDS.items() if _absent(module)]
if _absent("faster_coco_eval") and _absent("pycocotools"):
    _missing.append("faster-coco-eval")
if _missing:
    _message = (
        f"the bundled detectors need {', '.join(_missing)}: install them with "
        "pip install -e '.[detectors]' (from a clone of uotmatch)"
    )
    if _sys.argv and _sys.argv[0] == "-m":  # python -m detectors...: one line, as a CLI error
        _sys.stderr.write(f"error: {_message}\n")
        raise SystemExit(2)
    raise ImportError(_message)

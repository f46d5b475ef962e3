"""Sphinx configuration: API reference from the docstrings, tutorials executed by sphinx-gallery."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The Figure 1 tutorial imports the figure's numbers from docs/examples/figure1.py.
sys.path.insert(0, str(ROOT / "docs" / "examples"))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# The API page imports the Ultralytics adapter: no network, settings in a writable place.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", str(ROOT / "docs" / "_build" / "yolo-config"))

import uotmatch  # noqa: E402

project = "uotmatch"
author = "the uotmatch developers"
copyright = "2026, the uotmatch developers"
release = uotmatch.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served from _static: math renders without internet
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = [
    "_build",
    "tutorials",
    "examples",
    "auto_tutorials/*.ipynb",
    "auto_tutorials/*.py.md5",
]
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Types for the parameters a docstring documents, so a class whose constructor is private
# (Matching) lists no constructor fields as parameters.
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

sphinx_gallery_conf = {
    "examples_dirs": "tutorials",
    "gallery_dirs": "auto_tutorials",
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "matplotlib_animations": False,
    "show_memory": False,
    "write_computation_times": False,  # its page loads a table script from a CDN
}

html_theme = "alabaster"
html_title = f"uotmatch {release}"
html_theme_options = {
    "description": "Label assignment as unbalanced optimal transport",
    "page_width": "1200px",  # with custom.css: 100-character code lines fit, no scroll bar
    "body_max_width": "none",  # alabaster's default 800 px would clip them at a 1280 px window
}
html_static_path = ["_static"]
html_css_files = ["custom.css"]
viewcode_follow_imported_members = False  # source pages of uotmatch only (not torch, functools)

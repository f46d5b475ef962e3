"""Checks of the built docs (run by ``make docs`` after sphinx): what a reader without internet
and at the page's width sees.

* Math is rendered offline: the pages load MathJax from ``_static``, never from a CDN.
* No code line is wider than the page: every line of a ``<pre>`` block fits in ``MAX_CODE``
  characters (expected-output comments included), so none hides behind a scroll bar.
* The API page types every parameter (none shown as ``Any``) and lists no private constructor
  fields as parameters (``Matching`` is built by ``match()``, not by users).
* Tutorial figures are readable at the page's width: none is wider than ``MAX_FIGURE_PX``
  pixels (the page shows about 660; a wider figure is shrunk, its text with it).

    python docs/check_build.py docs/_build/html
"""

from __future__ import annotations

import html
import re
import struct
import sys
from pathlib import Path

#: Characters of a code line the page shows without scrolling (the project's line length; the
#: page is 1200 px wide and code is set at 0.8em, see conf.py and _static/custom.css).
MAX_CODE = 100
#: Widest tutorial figure, in pixels (the page shows about 900: none shrunk much).
MAX_FIGURE_PX = 1000


def png_width(path: Path) -> int:
    with open(path, "rb") as fh:
        head = fh.read(24)
    return struct.unpack(">I", head[16:20])[0]


def check(site: Path) -> list[str]:
    problems = []
    pages = sorted(site.rglob("*.html"))
    if not pages:
        return [f"{site}: no HTML pages (build the docs first)"]
    if not (site / "_static" / "mathjax" / "tex-chtml.js").exists():
        problems.append("MathJax is not served from _static/mathjax (sphinx-mathjax-offline)")
    for page in pages:
        text = page.read_text(encoding="utf-8")
        rel = page.relative_to(site)
        if re.search(r"<script[^>]+src=\"https?://", text):
            problems.append(f"{rel}: loads a script from the network")
        for block in re.findall(r"<pre>(.*?)</pre>", text, flags=re.S):
            for line in html.unescape(re.sub(r"<[^>]+>", "", block)).splitlines():
                if len(line) > MAX_CODE:
                    problems.append(f"{rel}: a code line of {len(line)} characters: {line[:60]}...")
    api = site / "api.html"
    if api.exists():
        text = html.unescape(re.sub(r"<[^>]+>", "", api.read_text(encoding="utf-8")))
        if re.search(r"\(Any\)", text):
            problems.append("api.html: a parameter typed as Any")
        start = text.find("class uotmatch.Matching")
        end = text.find("property", start)
        if start >= 0 and "Parameters" in text[start:end]:
            problems.append("api.html: Matching lists its private constructor fields as parameters")
    images = site / "_images"
    for png in sorted(images.glob("sphx_glr_plot_*.png")) if images.exists() else []:
        if "thumb" not in png.name and png_width(png) > MAX_FIGURE_PX:
            problems.append(f"_images/{png.name}: {png_width(png)} px wide (> {MAX_FIGURE_PX})")
    return problems


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    site = Path(argv[0] if argv else "docs/_build/html")
    problems = check(site)
    for p in problems:
        print(f"docs check: {p}", file=sys.stderr)
    print(f"docs check: {len(problems)} problem(s) in {site}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

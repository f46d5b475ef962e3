"""Checks of the built docs (run by ``make docs`` after sphinx): what a reader without internet
and at the page's width sees.

* Math is rendered offline: the pages load MathJax from ``_static``, never from a CDN.
* No code line is wider than the page: every line of a ``<pre>`` block fits in ``MAX_CODE``
  characters (expected-output comments included), so none hides behind a scroll bar.
* The API page types every parameter (none shown as ``Any``) and lists no private constructor
  fields as parameters (``Matching`` is built by ``match()``, not by users).
* Tutorial figures are readable at the page's width: none is wider than ``MAX_FIGURE_PX``
  pixels (the page shows about 660; a wider figure is shrunk, its text with it).
* In a real browser (headless Chromium, a ``BROWSER_WINDOW`` window) no code block of any
  page with long code lines scrolls sideways (its ``scrollWidth`` fits its ``clientWidth``),
  and a screenshot of the page with the widest code is kept in ``_check/widest-code.png``.
  Without Chromium (Debian: ``apt-get install chromium``) that is a problem, unless
  ``--no-browser``.

    python docs/check_build.py docs/_build/html [--no-browser]
"""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

#: Characters of a code line the page shows without scrolling (the project's line length; the
#: page is 1200 px wide and code is set at 0.8em, see conf.py and _static/custom.css).
MAX_CODE = 100
#: Widest tutorial figure, in pixels (the page shows about 900: none shrunk much).
MAX_FIGURE_PX = 1000
#: The browser window the pages are checked in (a common laptop width).
BROWSER_WINDOW = (1280, 900)
#: Pages with a code line at least this long are loaded in the browser.
BROWSER_FROM = 80

#: Appended to a copy of a page: on load, the code blocks that scroll sideways, as JSON.
_PROBE = """<script>
window.addEventListener("load", () => {
  const blocks = Array.from(document.querySelectorAll("pre"));
  const over = blocks.filter(p => p.scrollWidth > p.clientWidth + 1)
    .map(p => [p.scrollWidth, p.clientWidth, p.textContent.split("\\n")[0].slice(0, 40)]);
  const el = document.createElement("div");
  el.textContent = "UOTMATCH" + "-PROBE" + JSON.stringify(over) + "END" + "-PROBE";
  document.body.appendChild(el);
});
</script>"""


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


def _longest_code_line(text: str) -> int:
    blocks = re.findall(r"<pre>(.*?)</pre>", text, flags=re.S)
    lines = [
        line
        for block in blocks
        for line in html.unescape(re.sub(r"<[^>]+>", "", block)).splitlines()
    ]
    return max((len(line) for line in lines), default=0)


def browser(site: Path) -> list[str]:
    """The pages with long code lines, in headless Chromium at ``BROWSER_WINDOW``."""
    exe = next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    if exe is None:
        return [
            "no headless Chromium to check the pages in a browser (Debian: apt-get install "
            "chromium), or pass --no-browser"
        ]
    width, height = BROWSER_WINDOW
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}"]
    problems, widest = [], (0, None)
    for page in sorted(site.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        longest = _longest_code_line(text)
        widest = max(widest, (longest, page), key=lambda x: x[0])
        if longest < BROWSER_FROM:
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".html", dir=page.parent, delete=False) as fh:
            fh.write(text + _PROBE)
        try:
            done = subprocess.run(
                [*flags, "--virtual-time-budget=5000", "--dump-dom", Path(fh.name).as_uri()],
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            Path(fh.name).unlink()
        found = re.search(r"UOTMATCH-PROBE(.*?)END-PROBE", html.unescape(done.stdout))
        rel = page.relative_to(site)
        if found is None:
            problems.append(f"{rel}: Chromium did not load the page ({done.stderr[-200:]!r})")
            continue
        for scroll, client, first in json.loads(found.group(1)):
            problems.append(
                f"{rel}: a code block scrolls sideways at a {width} px window ({scroll} px of "
                f"code in {client} px; it starts {first!r})"
            )
    if widest[1] is not None:
        shot = site / "_check" / "widest-code.png"
        shot.parent.mkdir(exist_ok=True)
        subprocess.run(
            [*flags, f"--screenshot={shot}", widest[1].as_uri()],
            capture_output=True,
            timeout=120,
        )
        if not shot.exists() or shot.stat().st_size == 0:
            problems.append(f"no screenshot of {widest[1].relative_to(site)} was taken")
    return problems


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    use_browser = "--no-browser" not in argv
    argv = [a for a in argv if a != "--no-browser"]
    site = Path(argv[0] if argv else "docs/_build/html").resolve()
    problems = check(site)
    if use_browser and not problems:
        problems += browser(site)
    for p in problems:
        print(f"docs check: {p}", file=sys.stderr)
    print(f"docs check: {len(problems)} problem(s) in {site}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The wheel is the library: build the wheel and the sdist from a copy of the tracked files and
check what they carry (and that the version is the CHANGELOG's)."""

import email
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import uotmatch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _tracked_copy(dest: Path) -> Path:
    """The files git tracks (or the working tree without build outputs), copied to ``dest``."""
    try:
        files = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    pytest.importorskip("build")
    src = _tracked_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


def test_the_version_is_the_changelogs():
    first = re.search(r"^## (\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert first and uotmatch.__version__ == first.group(1)


def test_the_wheel_is_only_the_library(dists):
    wheel, _ = dists
    assert wheel.name == f"uotmatch-{uotmatch.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"uotmatch", f"uotmatch-{uotmatch.__version__}.dist-info"}
    assert "uotmatch/py.typed" in names
    assert "uotmatch/figure1.py" not in names
    assert {"uotmatch/detection/__init__.py", "uotmatch/integrations/transformers.py"} <= set(names)
    meta = zipfile.ZipFile(wheel).read(f"uotmatch-{uotmatch.__version__}.dist-info/METADATA")
    meta = email.message_from_bytes(meta)
    assert meta["Version"] == uotmatch.__version__
    assert meta["License-Expression"] == "MIT"
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_the_sdist_carries_no_test_suite_it_cannot_run(dists):
    _, sdist = dists
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "uotmatch/py.typed"} <= set(
        names
    )
    for absent in ("tests/", "detectors/", "benchmarks/", "docs/", "scripts/"):
        assert not any(n.startswith(absent) for n in names), absent

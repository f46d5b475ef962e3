#!/usr/bin/env bash
# The release check of a wheel: build it from a clean clone of HEAD, install it into an empty
# venv (with the pins of constraints/ci.txt, so torch comes from the local package folder), and
# run the README's first example there, outside the clone. About 3 minutes where pip finds
# torch locally. Usage: scripts/check_wheel.sh [WORKDIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
git clone --quiet "$ROOT" "$WORK/src"
python3 -m venv "$WORK/build-venv"
"$WORK/build-venv/bin/pip" install --quiet --disable-pip-version-check build
"$WORK/build-venv/bin/python" -m build --wheel --outdir "$WORK/dist" "$WORK/src" >/dev/null
python3 -m venv "$WORK/empty"
"$WORK/empty/bin/pip" install --quiet --disable-pip-version-check \
    -c "$WORK/src/constraints/ci.txt" "$WORK"/dist/uotmatch-*.whl
# The README's first example (the python block under "A first match"), as a doctest.
"$WORK/empty/bin/python" - "$WORK/src/README.md" "$WORK/first_example.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"```python\n(.*?)```", text[text.index("## A first match"):], re.S).group(1)
open(sys.argv[2], "w").write(block)
PY
cd "$WORK"
if "$WORK/empty/bin/python" -c "import detectors" 2>/dev/null; then
    echo "the wheel installed a detectors package" >&2
    exit 1
fi
"$WORK/empty/bin/python" -m doctest "$WORK/first_example.txt"
test -f "$("$WORK/empty/bin/python" -c 'import uotmatch, os; print(os.path.dirname(uotmatch.__file__))')/py.typed"
echo "wheel OK: $(ls "$WORK"/dist/*.whl), README's first example passes in an empty venv"

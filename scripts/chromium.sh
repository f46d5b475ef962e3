#!/usr/bin/env bash
# Make headless Chromium available for docs/check_build.py's browser check: present already,
# or installed from Debian's packages where this user may (root with apt-get). Exit status 1,
# with a note on stderr, when there is none: `make docs` then checks without a browser.
set -uo pipefail
for exe in chromium chromium-browser google-chrome; do
    command -v "$exe" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "docs: installing chromium (Debian) for the browser check" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq --no-install-recommends chromium \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }; } \
        >/dev/null 2>&1
    command -v chromium >/dev/null 2>&1 && exit 0
fi
echo "docs: no headless Chromium here (Debian: apt-get install chromium); the pages are not" \
    "checked in a browser" >&2
exit 1

#!/usr/bin/env bash
# Fetch, into the git-ignored folder .whl/, the wheels scripts/gpu_check.sh installs on a GPU
# machine without internet: the packages the tests and benchmarks need beyond torch,
# torchvision, scipy, numpy, pytest and hypothesis.
#
#   scripts/gpu_wheels.sh [PYTHON_VERSION]   # the GPU machine's Python, default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
    --implementation cp "${platforms[@]}" -d .whl \
    "POT==0.9.7.post1" "pycocotools>=2.0" "faster-coco-eval>=1.6"
ls -l .whl

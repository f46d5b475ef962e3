#!/usr/bin/env bash
# The prepared device check (issue 15): on a machine with a CUDA GPU and torch installed, run
# every CUDA test and the two benchmarks on the GPU, writing the tables to OUTDIR. Meant to
# finish in under five minutes; each step has its own time limit so a slow one cannot eat the
# others' time.
#
#   scripts/gpu_check.sh OUTDIR
#
# No internet is needed. Python packages the machine lacks (POT, pycocotools, faster-coco-eval)
# are installed from wheels in the git-ignored folder .whl/ if they are there: fetch them
# beforehand, on a machine with internet, with scripts/gpu_wheels.sh (it asks for the GPU
# machine's Python version). The project itself is used from this checkout (PYTHONPATH), not
# installed.
#
# OUTDIR receives: env.txt (GPU, versions), tests.log (pytest -k cuda), solver.md
# (benchmarks/bench_solver.py --device cuda --large), assigners.md (bench_assigners.py), and
# each step's log.
#
# GPU_CHECK_WHEELS=DIR reads the wheels from DIR instead of .whl/. GPU_CHECK_DEVICE=cpu runs the same steps on the CPU at smoke sizes (the CUDA tests are then
# all skipped): how the test suite checks this script without a GPU.
set -uo pipefail

out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out" || exit 2
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

wheels=${GPU_CHECK_WHEELS:-.whl}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "$wheels"/*.whl || { echo "gpu_check: installing $wheels/*.whl failed" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

device=${GPU_CHECK_DEVICE:-cuda}
case $device in
    cuda) quick=() ;;
    cpu) quick=(--quick) ;;
    *) echo "gpu_check: GPU_CHECK_DEVICE must be cuda or cpu, not '$device'" >&2; exit 2 ;;
esac

GPU_CHECK_DEVICE=$device "$PY" - > "$out/env.txt" <<'PYEOF' || { cat "$out/env.txt"; exit 2; }
import datetime
import os
import sys

import ot
import torch

print(f"date {datetime.date.today()}")
if os.environ["GPU_CHECK_DEVICE"] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device (GPU_CHECK_DEVICE=cpu for a dry run)")
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"gpu {torch.cuda.get_device_name(0)}, {memory:.0f} GiB, CUDA {torch.version.cuda}")
else:
    print("dry run on the CPU (GPU_CHECK_DEVICE=cpu)")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, POT {ot.__version__}")
PYEOF
cat "$out/env.txt"

status=0
step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local begin=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - begin)) s"
    [ "$rc" -eq 0 ] || status=1
}

# Every test that runs on CUDA: the device fixture's [cuda] cases and the test_cuda_* tests.
# Modules whose optional dependencies are missing here are skipped, not failed.
step tests 120 "$PY" -m pytest -q -p no:cacheprovider -k cuda tests
step solver 150 "$PY" benchmarks/bench_solver.py --device "$device" --large --repeats 2 \
    ${quick[@]+"${quick[@]}"} --out "$out/solver.md"
step assigners 60 "$PY" benchmarks/bench_assigners.py --device "$device" --repeats 5 \
    ${quick[@]+"${quick[@]}"} --out "$out/assigners.md"
echo "gpu_check: tables in $out (exit $status)"
exit $status

"""Shared by the detector tests: tiny-run flags and a 2-process gloo run through torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Flags every tiny training run in the tests shares (4 images a step, 64 px, no progress bars).
TINY_RUN = ["--batch-size", "4", "--short", "64", "--max-size", "64", "--no-progress"]

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="torchrun smoke test on Linux")


def torchrun(module: str, argv: list[str], port: int) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m module argv`` on the CPU; fails the test on error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(port), "-m", module, "--device", "cpu", *argv]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return run

"""How fast can any solver be on bench_solver's dense row? Its goal (8x POT in float32, 5x in
float64) against the least work a solve that returns a plan must do, on this host.

    python benchmarks/dense_floor.py              # ~20 s on 2 cores
    python benchmarks/dense_floor.py --no-native  # without the C parts (no compiler needed)

The workload is ``bench_solver.py``'s "OTA-like dense": ``[16, 20000, 20]`` + background, random
costs, eps 0.1, balanced, ``tol=1e-3``. Timed in one process, alternating, best of each block:

* **POT**: its torch backend looped over the batch and its numpy float64 backend, each at the
  loosest ``stopThr`` whose plans reach our error 1e-3 (``bench_solver.py``'s choice: 10 here),
  with its iteration count; the speed-up is against the faster of the two, as there;
* **ours**: ``uotmatch.match``;
* floors, each a part of every solve, none of them a solve:
  * **plan-sized fill**: a fresh ``[16, 20000, 21]`` tensor written once (the output's pages:
    above glibc's mmap threshold, every call maps and faults them anew; POT's per-item buffers
    are recycled from the heap);
  * **kernel**: ``exp(-C / eps)`` of the full cost into a fresh tensor, one torch operation;
  * **fused pass (C)**: the row minima and the stabilised kernel, written into a fresh plan in
    one pass per row (compiled with the system's ``cc -O3 -ffast-math``, vectorised ``exp``
    from glibc, split over torch's number of threads): what a solver of hand-fused kernels
    pays before its first sweep;
* **whole solve (C prototype)**, not a floor: that pass image by image into a kernel buffer that
  stays in cache, plain sweeps there until the rows' miss is at most 1e-3, the plan written once
  (no absorption or eps-scaling: a timing prototype for this row, checked by our error).

"POT / part" is, for a floor, the largest speed-up any solver can reach that does at least that
part.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ot
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_solver import (  # noqa: E402
    TARGET_ERROR,
    _best_time,
    _pot,
    _pot_threshold,
    dense_workload,
)

import uotmatch  # noqa: E402
from uotmatch._state import plan_error  # noqa: E402

EPS = 0.1
GOALS = {torch.float32: 8.0, torch.float64: 5.0}
PARTS_C = r"""
#include <math.h>
#include <stdlib.h>
#define PASS(NAME, T, MIN, EXP)                                                      \
void NAME(const T* C, const T* bg, long r0, long r1, int N, T eps, T* P) {          \
  T inv = 1 / eps;                                                                   \
  for (long r = r0; r < r1; r++) {                                                   \
    const T* c = C + r * N; T* p = P + r * (N + 1); T m = bg[r];                     \
    for (int j = 0; j < N; j++) m = MIN(m, c[j]);                                    \
    for (int j = 0; j < N; j++) p[j] = EXP((m - c[j]) * inv);                        \
    p[N] = EXP((m - bg[r]) * inv);                                                   \
  }                                                                                  \
}
PASS(pass_f32, float, fminf, expf)
PASS(pass_f64, double, fmin, exp)

/* The whole balanced solve, image by image (images i0 to i1): that pass into a kernel
   buffer that stays in cache, plain sweeps until the rows' relative L1 miss is at most tol, the
   plan written once. A prototype for timing (no absorption, no eps-scaling, no forbidden pairs). */
#define SOLVE(NAME, T, MIN, EXP, LOG, ABS)                                           \
void NAME(const T* C, const T* bg, const T* a, const T* b, int i0, int i1, int M, int N, \
          T eps, T tol, int max_iter, T* plan, T* f, T* g, int* iters) {             \
  int W = N + 1;                                                                     \
  {  /* per call: this thread's kernel buffer, reused image after image */           \
    T* K = malloc(sizeof(T) * (size_t)M * W); T* u = malloc(sizeof(T) * M);          \
    T* KTu = malloc(sizeof(T) * W); T* v = malloc(sizeof(T) * W);                    \
    for (int it = i0; it < i1; it++) {                                               \
      const T* c = C + (size_t)it * M * N; const T* bgi = bg + (size_t)it * M;       \
      const T* ai = a + (size_t)it * M; const T* bi = b + (size_t)it * W;            \
      T* fi = f + (size_t)it * M; T* gi = g + (size_t)it * W;                        \
      T* P = plan + (size_t)it * M * W; T inv = 1 / eps; int k;                      \
      for (int i = 0; i < M; i++) {                                                  \
        const T* ci = c + (size_t)i * N; T* Ki = K + (size_t)i * W; T m = bgi[i];    \
        for (int j = 0; j < N; j++) m = MIN(m, ci[j]);                               \
        for (int j = 0; j < N; j++) Ki[j] = EXP((m - ci[j]) * inv);                  \
        Ki[N] = EXP((m - bgi[i]) * inv); fi[i] = m; u[i] = 1;                        \
      }                                                                              \
      for (k = 1; k <= max_iter; k++) {                                              \
        T miss = 0, mass = 0;                                                        \
        for (int j = 0; j < W; j++) KTu[j] = 0;                                      \
        for (int i = 0; i < M; i++)                                                  \
          for (int j = 0; j < W; j++) KTu[j] += u[i] * K[(size_t)i * W + j];         \
        for (int j = 0; j < W; j++) v[j] = bi[j] / KTu[j];                           \
        for (int i = 0; i < M; i++) {                                                \
          T s = 0; const T* Ki = K + (size_t)i * W;                                  \
          for (int j = 0; j < W; j++) s += Ki[j] * v[j];                             \
          miss += ABS(u[i] * s - ai[i]); mass += ai[i]; u[i] = ai[i] / s;            \
        }                                                                            \
        if (miss <= tol * mass) break;                                               \
      }                                                                              \
      iters[it] = k;                                                                 \
      for (int i = 0; i < M; i++) {                                                  \
        for (int j = 0; j < W; j++)                                                  \
          P[(size_t)i * W + j] = u[i] * K[(size_t)i * W + j] * v[j];                 \
        fi[i] += eps * LOG(u[i]);                                                    \
      }                                                                              \
      for (int j = 0; j < W; j++) gi[j] = eps * LOG(v[j]);                           \
    }                                                                                \
    free(K); free(u); free(KTu); free(v);                                            \
  }                                                                                  \
}
SOLVE(solve_f32, float, fminf, expf, logf, fabsf)
SOLVE(solve_f64, double, fmin, exp, log, fabs)
"""


def compiled_parts():
    """The C parts, compiled and loaded, or None and why (no C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc, gcc) on PATH"
    with tempfile.TemporaryDirectory(prefix="uotmatch-floor-") as tmp:
        source, library = Path(tmp) / "parts.c", Path(tmp) / "parts.so"
        source.write_text(PARTS_C)
        done = subprocess.run(
            [cc, "-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", str(source), "-o",
             str(library), "-lm"],
            capture_output=True,
            text=True,
        )  # fmt: skip
        if done.returncode:
            return None, f"{cc} failed: {done.stderr.strip()[:200]}"
        return ctypes.CDLL(str(library)), None  # loaded: the file may go


_POOL: ThreadPoolExecutor | None = None


def in_parallel(work) -> None:
    """``work(k, n)`` for ``k < n``, on torch's number of threads (ctypes releases the GIL; the
    pool's idle threads sleep, where a second OpenMP runtime's would spin on torch's cores)."""
    global _POOL
    n = torch.get_num_threads()
    if _POOL is None:
        _POOL = ThreadPoolExecutor(n)
    for done in [_POOL.submit(work, k, n) for k in range(n)]:
        done.result()


def measure(dtype, cost, background, b, lib, rounds: int, block: int):
    """The faster POT's time, POT's iterations and the best time of each part, for ``dtype``."""
    B, M, N = cost.shape
    c, bg, bb = cost.to(dtype), background.to(dtype), b.to(dtype)
    full = torch.cat([c, bg[..., None]], -1)
    a_p = torch.ones(B, M, dtype=dtype)
    b_p = torch.cat([bb, M - bb.sum(-1, keepdim=True)], -1)
    # POT's numpy backend takes float64 whatever the row's dtype (as in bench_solver.py)
    full64, a64, b64 = full.double().numpy(), np.ones((B, M)), b_p.double().numpy()
    # Each backend's loosest stopThr whose plans reach our error TARGET_ERROR (bench_solver's
    # choice), and POT's own count of iterations there (its checks fall at 0, 10, 20, ...)
    inf = math.inf
    thr = _pot_threshold(full, a_p, b_p, EPS, inf, inf, TARGET_ERROR)
    thr64 = _pot_threshold(full64, a64, b64, EPS, inf, inf, TARGET_ERROR)
    iters = [
        ot.sinkhorn(a_p[i], b_p[i], full[i], EPS, stopThr=thr, log=True)[1]["niter"] + 1
        for i in range(B)
    ]
    notes: dict[str, str] = {}
    runs = {
        "POT torch": lambda: _pot(full, a_p, b_p, EPS, inf, inf, thr),
        "POT numpy f64": lambda: _pot(full64, a64, b64, EPS, inf, inf, thr64),
        "ours": lambda: uotmatch.match(c, EPS, b=bb, background_cost=bg, tol=TARGET_ERROR),
        "plan-sized fill": lambda: torch.empty(B, M, N + 1, dtype=dtype).fill_(0.0),
        "kernel": lambda: torch.mul(full, -1 / EPS).exp_(),
    }
    if lib is not None:
        fn = lib.pass_f32 if dtype == torch.float32 else lib.pass_f64
        real = ctypes.c_float if dtype == torch.float32 else ctypes.c_double

        ptr = ctypes.c_void_p

        def fused():
            plan = torch.empty(B, M, N + 1, dtype=dtype)
            cp, bgp, pp = ptr(c.data_ptr()), ptr(bg.data_ptr()), ptr(plan.data_ptr())
            rows = B * M
            in_parallel(
                lambda k, n: fn(cp, bgp, rows * k // n, rows * (k + 1) // n, N, real(EPS), pp)
            )
            return plan

        runs["fused pass (C)"] = fused
        solve = lib.solve_f32 if dtype == torch.float32 else lib.solve_f64

        def whole():
            plan = torch.empty(B, M, N + 1, dtype=dtype)
            f, g = torch.empty(B, M, dtype=dtype), torch.empty(B, N + 1, dtype=dtype)
            iters = torch.empty(B, dtype=torch.int32)
            inputs = [ptr(t.data_ptr()) for t in (c, bg, a_p, b_p)]
            outputs = [ptr(t.data_ptr()) for t in (plan, f, g, iters)]
            tol = real(TARGET_ERROR)
            in_parallel(
                lambda k, n: solve(
                    *inputs, B * k // n, B * (k + 1) // n, M, N, real(EPS), tol, 1000, *outputs
                )
            )
            return plan, f, g, iters

        plan, f, g, its = whole()
        a64_t, b64_t = a_p.double(), b_p.double()
        error = float(
            plan_error(
                plan.double(), f.double(), g.double(), a64_t, b64_t, math.inf, math.inf
            ).max()
        )
        notes["whole solve (C prototype)"] = (
            f"{int(its.min())}-{int(its.max())} sweeps, error {error:.1e}"
        )
        runs["whole solve (C prototype)"] = whole
    times: dict[str, list[float]] = {k: [] for k in runs}
    notes["ours"] = "{}-{} iterations, error {:.1e}".format(*_ours_note(runs["ours"]()))
    for r in range(rounds + 1):  # the first round warms every part up
        for name, fn_ in runs.items():
            t = _best_time(fn_, block)[0]
            if r:
                times[name].append(t)
    pot = min(min(times["POT torch"]), min(times["POT numpy f64"]))
    return pot, iters, {k: min(v) for k, v in times.items()}, notes


def _ours_note(m) -> tuple[int, int, float]:
    return int(m.iterations.min()), int(m.iterations.max()), float(m.marginal_error.max())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    p.add_argument("--block", type=int, default=3, help="runs per round, best kept (default: 3)")
    p.add_argument("--no-native", action="store_true", help="leave out the C parts")
    args = p.parse_args(argv)
    lib, why = (None, "--no-native") if args.no_native else compiled_parts()
    cost, background, b = dense_workload(16, 20000, 20, 10)
    print(
        f"OTA-like dense {tuple(cost.shape)} + background, eps {EPS:g}, balanced; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
        + ("" if lib else f"; C parts left out: {why}"),
        file=sys.stderr,
    )
    print(
        "\n| dtype | POT iterations | faster POT ms | goal: ms at most | part | ms | POT / part |"
    )
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        pot, iters, best_ms, notes = measure(
            dtype, cost, background, b, lib, args.rounds, args.block
        )
        goal = GOALS[dtype]
        head = (
            f"| {str(dtype).replace('torch.', '')} | {min(iters)}-{max(iters)} | {pot * 1e3:.1f} "
            f"| {pot * 1e3 / goal:.1f} ({goal:g}x)"
        )
        parts = ("ours", "plan-sized fill", "kernel", "fused pass (C)", "whole solve (C prototype)")
        for name in parts:
            if name in best_ms:
                t = best_ms[name]
                note = f" ({notes[name]})" if name in notes else ""
                print(f"{head} | {name}{note} | {t * 1e3:.1f} | {pot / t:.1f}x |", flush=True)
                head = "| | | |"


if __name__ == "__main__":
    main()

"""Solver speed: uotmatch.match against POT (looped over the batch) and scipy's Hungarian.

Same process, same inputs, every plan scored by the same marginal error (relative L1 violation of
the optimality conditions, :func:`uotmatch._state.marginal_error`). POT gets, per workload,
the loosest ``stopThr`` (its own criterion, checked every 10 iterations) whose plans reach
error < 1e-3 on every item; we run with ``tol=1e-3``.

    python benchmarks/bench_solver.py            # the workloads of the issue (a few minutes)
    python benchmarks/bench_solver.py --quick    # tiny sizes, a smoke run
    python benchmarks/bench_solver.py --no-screen  # without background screening
    python benchmarks/bench_solver.py --device cuda --large --out DIR/solver.md  # on a GPU

Workloads:
  OTA-like  [16, 22300, 20] + background (800 x 1333, strides 8-128), eps 0.1, balanced, k = 10
            per ground truth (centre-prior candidates, penalty 1e5 elsewhere, each gt with >= 2k
            candidates)
  OTA-like dense [16, 20000, 20] + background, random costs (screening prunes nothing), eps 0.1,
            balanced, k = 10
  DETR-like [64, 100, 30] + background, eps 0.05, (tau1, tau2) = (100, 1) and (inf, inf)
            (DETR matching cost: -p(class) + 5 L1 + 2 (-GIoU), normalised by its max)
  --large adds the sizes of the detectors the UOT paper trains beyond DETR, and a YOLO-sized one:
  Deformable-DETR-like [32, 300, 50] (300 queries), DINO-like [16, 900, 100] (900 queries), and
  YOLO-1280-like [64, 33600, 100] (1280 x 1280, strides 8-32, 100 ground truths, k = 10).

On a GPU (--device cuda) every time is taken by CUDA events after warm-up, POT runs its torch
backend on the same GPU (its numpy backend, on the host, is left out), and the Hungarian line
compares scipy looped on the host with our solve on the GPU. "peak MB" is the most tensor memory
one of our solves held beyond its inputs (CUDA: torch.cuda.max_memory_allocated; CPU: the
profiler's memory timeline), and "x cost" divides it by B * M * N * dtype size: how many copies
of the cost matrix a solve holds.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

import uotmatch
from uotmatch._state import plan_error
from uotmatch.detection import STRIDES, anchor_points, box_cxcywh_to_xyxy, generalized_box_iou

INF = math.inf
TARGET_ERROR = 1e-3
BLOCK = 3
#: Alternating rounds run before the recorded ones. A fresh process's first large allocations
#: pay for first-touch page faults (on this VM up to ~5 us a page: ~75 ms for our 60 MB float64
#: plan, which POT's small per-image buffers recycled from the heap never see).
WARMUP_ROUNDS = 2
POT_THRESHOLDS = [10.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9]
YOLO_STRIDES = (8, 16, 32)


def ota_workload(B: int, height: int, width: int, G: int, k: float, seed: int = 0, strides=STRIDES):
    """OTA-like costs ``[B, A, G]``, background ``[B, A]``, supplies ``[B, G]``."""
    gen = torch.Generator().manual_seed(seed)
    pts, stride = anchor_points((height, width), strides)  # [A, 2], [A]
    A = len(pts)
    ctr = torch.rand(B, G, 2, generator=gen) * torch.tensor([width, height])
    wh = torch.exp(torch.rand(B, G, 2, generator=gen) * 3 + 3.5)
    d = (pts[None, :, None] - ctr[:, None]).abs()  # [B, A, G, 2]
    cand = (d < wh[:, None] / 2).all(-1) & (d < 2.5 * stride[None, :, None, None]).all(-1)
    dist = d.norm(dim=-1)
    cand |= dist <= dist.kthvalue(int(2 * k), dim=1, keepdim=True).values  # >= 2k candidates
    iou = torch.rand(B, A, G, generator=gen) * 0.9 + 0.05
    cls = torch.rand(B, A, G, generator=gen) * 2
    cost = cls + 1.5 * -iou.log() + 1e5 * (~cand)
    background = torch.rand(B, A, generator=gen) * 0.5
    return cost, background, torch.full((B, G), float(k))


def dense_workload(B: int, M: int, G: int, k: float, seed: int = 0):
    """OTA-like costs ``[B, M, G]`` without the centre prior: the same random classification and
    IoU terms and background for every pair (no penalties, every row near every ground truth),
    so background screening prunes nothing and the solve is dense."""
    gen = torch.Generator().manual_seed(seed)
    iou = torch.rand(B, M, G, generator=gen) * 0.9 + 0.05
    cls = torch.rand(B, M, G, generator=gen) * 2
    cost = cls + 1.5 * -iou.log()
    background = torch.rand(B, M, generator=gen) * 0.5
    return cost, background, torch.full((B, G), float(k))


def detr_workload(B: int, Q: int, G: int, K: int = 20, seed: int = 0):
    """DETR matching costs ``[B, Q, G]`` normalised by each item's max (as the UOT paper)."""
    gen = torch.Generator().manual_seed(seed)
    tgt = torch.cat(
        [
            torch.rand(B, G, 2, generator=gen) * 0.8 + 0.1,
            torch.rand(B, G, 2, generator=gen) * 0.3 + 0.05,
        ],
        -1,
    )
    near = tgt[:, torch.randint(G, (Q,), generator=gen)]  # each query near some target
    pred = (near + torch.randn(B, Q, 4, generator=gen) * 0.05).clamp(0.02, 0.98)
    labels = torch.randint(K, (B, G), generator=gen)
    prob = torch.randn(B, Q, K + 1, generator=gen).mul(2).softmax(-1)
    cls = -prob.gather(2, labels[:, None, :].expand(B, Q, G))
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt))
    cost = cls + 5 * (pred[:, :, None] - tgt[:, None]).abs().sum(-1) - 2 * giou
    cost = cost - cost.amin((1, 2), keepdim=True)
    return cost / cost.amax((1, 2), keepdim=True)


class _Timing:
    seconds = 0.0


def device_timer(device):
    """A context manager factory timing its block on ``device``: CUDA events (the time of the
    GPU work, synchronised at the end) on a GPU, ``time.perf_counter`` otherwise. The result is
    in the yielded object's ``seconds``."""
    device = torch.device(device)

    @contextlib.contextmanager
    def timer():
        t = _Timing()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield t
            end.record()
            torch.cuda.synchronize(device)
            t.seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            yield t
            t.seconds = time.perf_counter() - begin

    return timer


def _best_time(fn, repeats: int, timer=None) -> tuple[float, object]:
    timer = timer or device_timer("cpu")
    out, times = None, []
    for _ in range(repeats):
        with timer() as t:
            out = fn()
        times.append(t.seconds)
    return min(times), out


@contextlib.contextmanager
def _quiet():
    """The process's stdout and stderr (file descriptors 1 and 2) sent to /dev/null: the torch
    profiler's C++ side (Kineto) logs ``profiler_start`` lines and, on a machine without a GPU,
    ``gpuGetDeviceCount failed``, which are noise in a benchmark's output."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def peak_memory(fn, inputs=()) -> int:
    """The most memory (bytes) ``fn()`` holds at once beyond what was allocated before it, on
    the device of the first of ``inputs``. CUDA: ``torch.cuda.max_memory_allocated``. CPU: the
    torch profiler's memory timeline (tensors allocated before the call left out) plus the peak
    of what ``tracemalloc`` sees in another run (numpy buffers: the solver takes large zeroed
    CPU plans from numpy's calloc); adding the two peaks bounds the true one from above."""
    device = inputs[0].device if inputs else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    import tracemalloc

    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    tracemalloc.start()  # a run of its own: it would also count the profiler's allocations
    try:
        fn()
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    with (
        _quiet(),
        profile(
            activities=[ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True,
        ) as prof,
    ):
        fn()
    timeline = prof._memory_profile().timeline
    before = {key for _, action, (key, _), _ in timeline if action == Action.PREEXISTING}
    held = peak = 0
    for _, action, (key, _), nbytes in timeline:
        if key.device == device and key not in before and action != Action.INCREMENT_VERSION:
            held += nbytes if action == Action.CREATE else -abs(nbytes)
            peak = max(peak, held)
    return peak + numpy_peak


def _error(plans, fs, gs, a, b, tau1, tau2) -> float:
    """Our marginal error of (possibly POT's) plans and potentials, in float64, worst item."""

    def stack(xs):
        return torch.stack([torch.as_tensor(x).double() for x in xs])

    return float(
        plan_error(stack(plans), stack(fs), stack(gs), stack(a), stack(b), tau1, tau2).max()
    )


def _pot(C, a, b, eps, tau1, tau2, thr):
    """POT looped over the batch; returns plans and potentials (eps * log scalings)."""
    plans, fs, gs = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c, ai, bi in zip(C, a, b, strict=True):
            if math.isinf(tau1) and math.isinf(tau2):
                P, log = ot.sinkhorn(ai, bi, c, eps, stopThr=thr, numItermax=100_000, log=True)
                fs.append(eps * log["u"].log() if torch.is_tensor(c) else eps * np.log(log["u"]))
                gs.append(eps * log["v"].log() if torch.is_tensor(c) else eps * np.log(log["v"]))
            else:
                P, log = ot.unbalanced.sinkhorn_unbalanced(
                    ai,
                    bi,
                    c,
                    eps,
                    (tau1, tau2),
                    reg_type="entropy",
                    stopThr=thr,
                    numItermax=100_000,
                    log=True,
                )
                fs.append(eps * log["logu"])
                gs.append(eps * log["logv"])
            plans.append(P)
    return plans, fs, gs


def _pot_threshold(C, a, b, eps, tau1, tau2, target, thresholds=POT_THRESHOLDS) -> float:
    for thr in thresholds:
        plans, fs, gs = _pot(C, a, b, eps, tau1, tau2, thr)
        if _error(plans, fs, gs, a, b, tau1, tau2) < target:
            return thr
    return thresholds[-1]


def run(
    name,
    cost,
    background,
    b,
    eps,
    tau1,
    tau2,
    repeats,
    dtypes,
    rows,
    target=TARGET_ERROR,
    warmup=WARMUP_ROUNDS,
    screen=None,
    block=BLOCK,
    pot_thresholds=POT_THRESHOLDS,
):
    """Time POT and ours on the same batch in alternating rounds (robust to machine drift):
    report each side's best time and the median of the per-round speed-ups. ``cost``,
    ``background`` and ``b`` are on the device to measure on."""
    B, M, N = cost.shape
    device = cost.device
    timer = device_timer(device)
    bsum = b.sum(-1, keepdim=True)
    say_progress(f"{name} {tuple(cost.shape)}, tau {tau1:g}, {tau2:g}, error < {target:g} ...")

    def pot_setup(dtype, numpy):
        """POT's inputs (torch tensors of ``dtype``, or float64 numpy), its loosest stopThr for
        the target, and a timed callable."""
        C = torch.cat([cost, background[..., None]], -1).to(dtype)
        a_p = torch.ones(B, M, dtype=dtype, device=device)
        b_p = torch.cat([b, (M - bsum).clamp_min(0)], -1).to(dtype)
        if numpy:
            C, a_p, b_p = (x.double().cpu().numpy() for x in (C, a_p, b_p))
        thr = _pot_threshold(C, a_p, b_p, eps, tau1, tau2, target, pot_thresholds)
        plans, fs, gs = _pot(C, a_p, b_p, eps, tau1, tau2, thr)
        return (
            thr,
            _error(plans, fs, gs, a_p, b_p, tau1, tau2),
            (lambda: _pot(C, a_p, b_p, eps, tau1, tau2, thr)),
        )

    # POT's numpy backend only where it is a peer: on the host.
    numpy_pot = pot_setup(torch.float64, numpy=True) if device.type == "cpu" else None
    for dtype in dtypes:
        # POT on the very same tensors (its torch backend, this dtype, this device), and on the
        # CPU as numpy float64; the speed-up is against the faster of the two.
        torch_pot = pot_setup(dtype, numpy=False)
        c, bg, bb = cost.to(dtype), background.to(dtype), b.to(dtype)

        def ours(c=c, bg=bg, bb=bb):
            return uotmatch.match(
                c, eps, tau1, tau2, b=bb, background_cost=bg, tol=target, screen=screen
            )

        m = ours()  # warm-up
        memory = peak_memory(ours, (c, bg, bb))
        # Our error measured like POT's, on the returned plan and potentials (not our report).
        a_full = torch.ones(B, M, dtype=torch.float64, device=device)
        b_full = torch.cat([b, (M - bsum).clamp_min(0)], -1)
        our_error = _error(m.plan, m.f, m.g, a_full, b_full, tau1, tau2)
        t_us, t_torch, t_numpy, ratios = [], [], [], []
        for i in range(warmup + repeats):
            # Blocks of `block` runs, best of each: the first run after the other library pays
            # for its thread pools still spinning.
            t_us.append(_best_time(ours, block, timer)[0])
            t_torch.append(_best_time(torch_pot[2], block, timer)[0])
            if numpy_pot is not None:
                t_numpy.append(_best_time(numpy_pot[2], block)[0])
            ratios.append(min(t_torch[-1], *t_numpy[-1:]) / t_us[-1])
            if i < warmup:  # not recorded: allocator and page warm-up on both sides
                t_us, t_torch, t_numpy, ratios = [], [], [], []
        rows.append(
            (
                f"{name} (error < {target:g})",
                f"{tau1:g}, {tau2:g}",
                str(dtype).replace("torch.", ""),
                min(t_us) * 1e3,
                int(m.iterations.max()),
                our_error,
                memory / 2**20,
                memory / (c.numel() * c.element_size()),
                min(t_torch) * 1e3,
                min(t_numpy) * 1e3 if t_numpy else math.nan,
                f"{torch_pot[0]:g} / {numpy_pot[0]:g}" if numpy_pot else f"{torch_pot[0]:g} / -",
                max(torch_pot[1], numpy_pot[1]) if numpy_pot else torch_pot[1],
                statistics.median(ratios),
            )
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()


def say_progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds per workload")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--no-screen", action="store_true", help="turn background screening off (for comparison)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument(
        "--large",
        action="store_true",
        help="also the Deformable-DETR-, DINO- and YOLO-1280-sized workloads (meant for a GPU)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the tables to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    screen = False if args.no_screen else None
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    warmup = 0 if args.quick else WARMUP_ROUNDS
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.float64]
    rows, lines = [], []

    def say(text=""):
        print(text)
        lines.append(text)

    def on(*tensors):
        return [t.to(device) for t in tensors]

    if args.quick:
        cost, bg, b = on(*ota_workload(2, 128, 160, 4, 3))
    else:
        cost, bg, b = on(*ota_workload(16, 800, 1333, 20, 10))
    run("OTA-like", cost, bg, b, 0.1, INF, INF, repeats, dtypes, rows, warmup=warmup, screen=screen)
    if not args.quick:  # our default tol: where the closed-form single-entry columns pay off
        run(
            "OTA-like",
            cost,
            bg,
            b,
            0.1,
            INF,
            INF,
            repeats,
            [torch.float32],
            rows,
            1e-5,
            warmup,
            screen,
        )
    dense_shape = (2, 300, 4, 3) if args.quick else (16, 20000, 20, 10)
    d_cost, d_bg, d_b = on(*dense_workload(*dense_shape))
    run("OTA-like dense", d_cost, d_bg, d_b, 0.1, INF, INF, repeats, dtypes, rows, warmup=warmup)
    del d_cost, d_bg, d_b
    B, Q, G = (4, 20, 6) if args.quick else (64, 100, 30)
    detr, detr_bg = on(detr_workload(B, Q, G), torch.full((B, Q), 0.5))
    ones = torch.ones(B, G, device=device)
    for taus in [(100.0, 1.0), (INF, INF)]:
        run("DETR-like", detr, detr_bg, ones, 0.05, *taus, repeats, dtypes, rows, warmup=warmup)
    shapes = [
        f"OTA-like {tuple(cost.shape)}",
        f"OTA-like dense {dense_shape[:3]}",
        f"DETR-like {tuple(detr.shape)}",
    ]

    if args.large:
        # One round, blocks of one: POT alone takes seconds per round at these sizes.
        large = dict(warmup=1, block=1, screen=screen, pot_thresholds=POT_THRESHOLDS[2:])
        for name, (B, Q, G) in [
            ("Deformable-DETR-like", (32, 300, 50)),
            ("DINO-like", (16, 900, 100)),
        ]:
            B, Q, G = (2, 3 * Q // 100, G // 10) if args.quick else (B, Q, G)
            d, d_bg = on(detr_workload(B, Q, G), torch.full((B, Q), 0.5))
            ones = torch.ones(B, G, device=device)
            for taus in [(100.0, 1.0), (INF, INF)]:
                run(name, d, d_bg, ones, 0.05, *taus, 1, [torch.float32], rows, **large)
            shapes.append(f"{name} {tuple(d.shape)}")
            del d, d_bg
        size, (B, G) = (160, (2, 8)) if args.quick else (1280, (64, 100))
        y_cost, y_bg, y_b = on(*ota_workload(B, size, size, G, 10, strides=YOLO_STRIDES))
        run("YOLO-1280-like", y_cost, y_bg, y_b, 0.1, INF, INF, 1, [torch.float32], rows, **large)
        shapes.append(f"YOLO-1280-like {tuple(y_cost.shape)}")
        del y_cost, y_bg, y_b

    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    say(
        f"\nshapes (each + background): {', '.join(shapes)}; device {device}{gpu}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} CPU threads, POT {ot.__version__}\n"
    )
    say(
        "| workload | tau1, tau2 | dtype | ours ms | ours iters | ours error | ours peak MB "
        "(x cost) | POT torch ms | POT numpy f64 ms | POT stopThr (torch / numpy) | POT error "
        "| speed-up vs faster POT |"
    )
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        numpy_ms = "-" if math.isnan(r[9]) else f"{r[9]:.1f}"
        say(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]} | {r[5]:.1e} "
            f"| {r[6]:.1f} ({r[7]:.1f}x) | {r[8]:.1f} | {numpy_ms} | {r[10]} | {r[11]:.1e} "
            f"| **{r[12]:.1f}x** |"
        )

    # Hungarian: scipy looped on the host vs our exact eps = 0 limit (which calls it) and our
    # eps = 0.05, both on the device.
    timer = device_timer(device)
    C_np = detr.double().cpu().numpy()
    t_lsa, _ = _best_time(lambda: [linear_sum_assignment(c) for c in C_np], repeats)
    t_exact, _ = _best_time(
        lambda: uotmatch.match(detr, 0.0, background_cost=detr_bg), repeats, timer
    )
    t_soft, _ = _best_time(
        lambda: uotmatch.match(detr, 0.05, background_cost=detr_bg, tol=TARGET_ERROR),
        repeats,
        timer,
    )
    say(
        f"\nHungarian on DETR-like {tuple(detr.shape)}: scipy linear_sum_assignment looped on the "
        f"host {t_lsa * 1e3:.2f} ms; uotmatch eps=0 (exact, same LSA + background) "
        f"{t_exact * 1e3:.2f} ms; uotmatch eps=0.05 balanced on {device} {t_soft * 1e3:.2f} ms "
        f"({t_lsa / t_soft:.2f}x scipy)"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()

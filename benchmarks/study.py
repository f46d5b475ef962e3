"""A resumable multi-seed study of the assigners: a grid of (framework, assignment, seed) runs,
and statistics a reviewer accepts.

    python benchmarks/study.py --out runs/study                     # the CPU grid, 3 seeds
    python benchmarks/study.py --out runs/study --report            # tables and plots so far
    python benchmarks/study.py --out runs/study --steps             # paired step times (idle!)
    python benchmarks/study.py --paper --data /data/coco --out runs/study-coco   # on a GPU

Frameworks and assignments (``--frameworks``; the first assignment is the framework's own):

* ``fcos``: the bundled FCOS (``python -m detectors.fcos.train``) with ``fcos`` (its centre
  sampling rule), ``atss``, ``simota``, ``ota`` and ``uot`` (``UOTAssigner``, tau1 10, tau2 1).
* ``tv-fcos``: torchvision's FCOS, its own rule or ``use_assigner(model, OTAAssigner())``.
* ``yolo``: Ultralytics YOLOv8n, TAL (its own), ``trainer(OTAAssigner())`` or
  ``trainer(UOTAssigner(tau1=10, tau2=1))``.
* ``hf-deformable``: a tiny Hugging Face Deformable DETR, its Hungarian or the UOT matcher with
  the plan-weighted loss.

Every finished run writes its result to ``OUT/study.json`` at once (AP, AP50, AR100, the AP of
each validation image, step and wall time, the exact command, the versions) and its detections
to ``OUT/detections/``; a rerun skips finished runs, and a bundled-FCOS run interrupted midway
continues from its checkpoint (``--resume``), so the grid fills over several sittings. Progress
shows the grid and an ETA.

The report (``OUT/study.md``, ``OUT/study.png``): per cell the mean and standard deviation over
seeds; per assignment against its framework's own, the paired difference (same seed: same
initialisation and data order) with a 95% t-interval over seeds, and a paired bootstrap over
validation images (the mean per-image AP difference, 2000 resamples) for each seed; "no
detectable difference" where the interval holds 0. Step times come from ``--steps``: measured
alternately on the same batches in one process (the machine idle), not from the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: framework -> its assignments, the framework's own first.
GRID = {
    "fcos": ("fcos", "atss", "simota", "ota", "uot"),
    "tv-fcos": ("own", "ota"),
    "yolo": ("tal", "ota", "uot"),
    "hf-deformable": ("own", "uot"),
}
#: The bundled FCOS's UOT regime (the one the other frameworks use too).
UOT_FLAGS = ["--tau1", "10", "--tau2", "1"]
#: The runs of train_frameworks.py that each (framework, assignment) is.
FRAMEWORK_RUNS = {
    ("tv-fcos", "own"): "tv-fcos",
    ("tv-fcos", "ota"): "tv-fcos-ota",
    ("yolo", "tal"): "yolo-tal",
    ("yolo", "ota"): "yolo-ota",
    ("yolo", "uot"): "yolo-uot",
    ("hf-deformable", "own"): "hf-deformable",
    ("hf-deformable", "uot"): "hf-deformable-uot",
}
#: A first guess of a run's wall time (s) on 2 CPU cores, for the ETA before any run finished.
GUESS_S = {"fcos": 300, "tv-fcos": 420, "yolo": 400, "hf-deformable": 900}
BOOTSTRAP = 2000


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "ultralytics", "transformers", "uotmatch"):
        with contextlib.suppress(ImportError, AttributeError):
            out[name] = __import__(name).__version__
    return out


# -- the runs ----------------------------------------------------------------------------------


def _fcos_run(assignment: str, seed: int, data: Path, args, out: Path) -> dict:
    """The bundled FCOS through its CLI, in a subprocess (continued with --resume when a
    previous sitting was interrupted); detections from its checkpoint."""
    import torch

    from detectors.common.checkpoint import load_checkpoint
    from detectors.common.data import CocoDetection, collate, default_transforms
    from detectors.common.engine import evaluate
    from detectors.fcos.train import FCOSConfig, build_model

    run = out / "runs" / f"fcos-{assignment}-seed{seed}"
    command = [sys.executable, "-m", "detectors.fcos.train", "--data", str(data)]
    command += ["--out", str(run), "--assigner", assignment, "--epochs", str(args.fcos_epochs)]
    command += ["--batch-size", str(args.batch_size), "--short", str(args.size)]
    command += ["--max-size", str(args.size), *shlex.split(args.fcos_args)]
    command += ["--seed", str(seed), "--eval-every", "0", "--device", args.device_torch]
    command += UOT_FLAGS if assignment == "uot" else []
    resume = ["--resume"] if (run / "last.pth").exists() else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*command, *resume], cwd=ROOT, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed with status {done.returncode}")
    state = load_checkpoint(run / "last.pth")
    cfg = FCOSConfig(**{**FCOSConfig.upgrade(state["config"]), "resume": False})
    val = CocoDetection(
        data,
        data / "annotations" / "instances_val.json",
        default_transforms(False, cfg.short, cfg.max_size),
    )
    model = build_model(cfg, state["num_classes"])
    model.load_state_dict(state["model"])
    device = torch.device(args.device_torch)
    loader = torch.utils.data.DataLoader(val, args.batch_size, collate_fn=collate)
    detections: list = []
    metrics = evaluate(model.to(device), model.detect, loader, val, device, False, keep=detections)
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median(1 / r["it_per_s"] for r in log)
    return {**metrics, "step_s": step_s, "detections": detections, "command": command}


def _framework_run(framework: str, assignment: str, seed: int, data: Path, args, out: Path):
    """A run of train_frameworks.py (in this process: a run interrupted midway starts over)."""
    tf = _load("train_frameworks")
    name = FRAMEWORK_RUNS[framework, assignment]
    targs = tf.parser().parse_args(
        [
            "--out", str(out / "frameworks"),
            "--size", str(args.size),
            "--batch-size", str(args.batch_size),
            "--tv-epochs", str(args.tv_epochs),
            "--yolo-epochs", str(args.yolo_epochs),
            "--hf-epochs", str(args.hf_epochs),
            "--device", args.device,
        ]
    )  # fmt: skip
    if framework == "tv-fcos":
        r = tf.train_torchvision(name, data, targs, seed)
    elif framework == "hf-deformable":
        r = tf.train_hf(name, data, targs, seed)
    else:
        yolo_data = out / "data-yolo" / "data.yaml"
        if not yolo_data.exists():
            from detectors.data.yolo import write_yolo

            write_yolo(data, out / "data-yolo")
        r = tf.train_yolo(name, data, yolo_data, targs, seed, out / "frameworks")
    r["command"] = [
        sys.executable, "benchmarks/train_frameworks.py", "--runs", name,
        "--seeds", str(seed), *sys.argv[1:],
    ]  # fmt: skip
    return r


def _record(path: Path, key: str, result: dict) -> dict:
    """Add one finished run to the results file, atomically; returns all the results.

    The file is read again first, so that another sitting writing into the same directory
    (say, another framework's cells) loses none of its runs; a kill loses at most the run in
    progress."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = result
    fd, tmp = tempfile.mkstemp(prefix=".study-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(results, indent=1))
    os.replace(tmp, path)
    return results


def run_grid(args) -> dict:
    """Every (framework, assignment, seed) run not finished yet; returns the results."""
    from detectors.common.evaluation import per_image_ap
    from detectors.data import colorboxes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    if not (data / "annotations" / "instances_val.json").exists():
        colorboxes.generate(
            data, train=args.train, val=args.val, size=args.size, crowded=True, progress=False
        )
    path = out / "study.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    todo = [
        (f, a, s)
        for s in args.seeds
        for f in args.frameworks
        for a in GRID[f]
        if _key(f, a, s) not in results
    ]
    began, ran = time.perf_counter(), 0
    for framework, assignment, seed in todo:
        key = _key(framework, assignment, seed)
        print(_grid_status(results, args, todo[ran:], began, ran), flush=True)
        print(f"\n== {key}", flush=True)
        start = time.perf_counter()
        if framework == "fcos":
            r = _fcos_run(assignment, seed, data, args, out)
        else:
            r = _framework_run(framework, assignment, seed, data, args, out)
        detections = r.pop("detections")
        ann = data / "annotations" / "instances_val.json"
        r["per_image_ap"] = {str(k): v for k, v in per_image_ap(ann, detections).items()}
        r["wall_s"] = time.perf_counter() - start
        r["versions"] = _versions()
        (out / "detections").mkdir(exist_ok=True)
        with gzip.open(out / "detections" / f"{key.replace('/', '-')}.json.gz", "wt") as fh:
            json.dump(detections, fh)
        results = _record(path, key, r)
        ran += 1
        print(f"   {key}: AP {100 * r['AP']:.1f}, {r['wall_s'] / 60:.1f} min", flush=True)
    print(_grid_status(results, args, [], began, ran), flush=True)
    return results


def _key(framework: str, assignment: str, seed: int) -> str:
    return f"{framework}/{assignment}/seed{seed}"


def _grid_status(results: dict, args, todo: list, began: float, ran: int) -> str:
    """The grid (AP of each finished run, ``..`` for those to come) and an ETA."""
    lines = [f"study: {len(results)} runs done, {len(todo)} to go"]
    for f in args.frameworks:
        for a in GRID[f]:
            cells = []
            for s in args.seeds:
                r = results.get(_key(f, a, s))
                cells.append(f"{100 * r['AP']:5.1f}" if r else "   ..")
            lines.append(f"  {f:>14} {a:>7}: " + " ".join(cells))
    walls: dict[str, list] = {}
    for key, r in results.items():
        walls.setdefault(key.split("/")[0], []).append(r["wall_s"])
    eta = sum(
        statistics.mean(walls[f]) if f in walls else GUESS_S[f] * args.epoch_scale
        for f, _, _ in todo
    )
    if eta:
        lines.append(f"  ETA {eta / 3600:.1f} h ({len(todo)} runs)")
    return "\n".join(lines)


# -- statistics --------------------------------------------------------------------------------


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student's t interval of the mean (NaN bounds for one value)."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_bootstrap(a: dict, b: dict, draws: int = BOOTSTRAP, seed: int = 0):
    """``(mean, low, high)`` of the mean per-image AP difference ``b - a`` over the images both
    runs scored, with a 95% percentile interval from resampling the images."""
    import numpy as np

    common = sorted(set(a) & set(b))
    d = np.array([b[i] - a[i] for i in common])
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (draws, len(d)))].mean(1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _reading(low: float, high: float) -> str:
    if math.isnan(low):
        return "one seed"
    if low <= 0 <= high:
        return "no detectable difference"
    return "better" if low > 0 else "worse"


def report(results: dict, args) -> str:
    """The markdown report (cells, paired differences) and the plot beside it."""
    seeds = sorted({int(k.rsplit("seed", 1)[1]) for k in results})
    lines = [
        f"Seeds {seeds}; AP, AP50, AR100 in percent, mean ± std over seeds. Paired difference: "
        "AP of the assignment minus the framework's own, same seed; 95% t-interval over seeds; "
        "per-image bootstrap: the mean per-image AP difference with its 95% interval, per seed.",
        "",
        "| framework | assignment | seeds | AP | AP50 | AR100 | paired ΔAP (95% CI) | reading "
        "| per-image ΔAP per seed (95% CI) | step time vs own |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    steps = (
        json.loads((Path(args.out) / "step_times.json").read_text())
        if (Path(args.out) / "step_times.json").exists()
        else {}
    )
    plot = []
    for f in GRID:
        own = GRID[f][0]
        for a in GRID[f]:
            runs = {s: results[_key(f, a, s)] for s in seeds if _key(f, a, s) in results}
            if not runs:
                continue

            def cell(metric, runs=runs):
                v = [100 * r[metric] for r in runs.values()]
                sd = f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else ""
                return f"{statistics.fmean(v):.1f}{sd}"

            diff = reading = boot = "—"
            if a != own:
                pairs = [
                    (results[_key(f, own, s)], r)
                    for s, r in runs.items()
                    if _key(f, own, s) in results
                ]
                if pairs:
                    d = [100 * (r["AP"] - o["AP"]) for o, r in pairs]
                    mean, low, high = t_interval(d)
                    diff = f"{mean:+.2f}" + (
                        "" if math.isnan(low) else f" ({low:+.2f}, {high:+.2f})"
                    )
                    reading = _reading(low, high)
                    bs = [paired_bootstrap(o["per_image_ap"], r["per_image_ap"]) for o, r in pairs]
                    boot = "; ".join(
                        f"{100 * m:+.1f} ({100 * lo:+.1f}, {100 * hi:+.1f})" for m, lo, hi in bs
                    )
                    plot.append((f, a, d, (mean, low, high)))
            key_own = f"{f}/{own}"
            step = (
                f"{steps[f'{f}/{a}'] / steps[key_own]:.2f}x"
                if f"{f}/{a}" in steps and key_own in steps
                else "—"
            )
            lines.append(
                f"| {f} | {a} | {len(runs)} | {cell('AP')} | {cell('AP50')} | {cell('AR100')} "
                f"| {diff} | {reading} | {boot} | {step} |"
            )
    _plot(results, seeds, plot, Path(args.out) / "study.png")
    return "\n".join(lines)


def _plot(results: dict, seeds: list, diffs: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = [f for f in GRID if any(k.startswith(f + "/") for k in results)]
    if not frameworks:
        return
    fig, axes = plt.subplots(2, len(frameworks), figsize=(3.2 * len(frameworks), 6), squeeze=False)
    for col, f in enumerate(frameworks):
        ax = axes[0, col]
        for x, a in enumerate(GRID[f]):
            ap = [100 * results[_key(f, a, s)]["AP"] for s in seeds if _key(f, a, s) in results]
            ax.scatter([x] * len(ap), ap, s=14, color="tab:blue")
            if ap:
                ax.hlines(statistics.fmean(ap), x - 0.25, x + 0.25, color="black")
        ax.set_xticks(range(len(GRID[f])), GRID[f], rotation=30)
        ax.set_title(f)
        ax.set_ylabel("AP (per seed; bar: mean)") if col == 0 else None
        ax = axes[1, col]
        rows = [(a, d, ci) for g, a, d, ci in diffs if g == f]
        for x, (_, d, (mean, low, high)) in enumerate(rows):
            ax.scatter([x] * len(d), d, s=10, color="tab:gray")
            if not math.isnan(low):
                ax.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt="o", color="tab:red")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)), [a for a, _, _ in rows], rotation=30)
        ax.set_ylabel("ΔAP vs its own (per seed; 95% CI)") if col == 0 else None
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- step times ------------------------------------------------------------------------------


def step_times(args) -> dict:
    """Paired step times of every framework's assignments (same batches and initialisation,
    alternating rounds in one process): run on an idle machine."""
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    times = {}
    if "fcos" in args.frameworks:
        ta = _load("train_assigners")
        width = shlex.split(args.fcos_args)

        def flag(name, default):
            return int(width[width.index(name) + 1]) if name in width else default

        targs = argparse.Namespace(
            size=args.size, batch_size=args.batch_size, seed=0, assigners=list(GRID["fcos"]),
            channels=flag("--channels", 64), head_depth=flag("--head-depth", 2),
        )  # fmt: skip
        for a, t in ta.paired_step_times(data, targs, rounds=3).items():
            times[f"fcos/{a}"] = t
    others = [f for f in args.frameworks if f != "fcos"]
    if others:
        tf = _load("train_frameworks")
        targs = tf.parser().parse_args(
            ["--size", str(args.size), "--batch-size", str(args.batch_size),
             "--hf-epochs", str(args.hf_epochs if "hf-deformable" in others else 0)]
        )  # fmt: skip
        paired = tf.paired_step_times(data, targs, rounds=3)
        for (f, a), name in FRAMEWORK_RUNS.items():
            if f in others and name in paired:
                times[f"{f}/{a}"] = paired[name]
    path = out / "step_times.json"  # frameworks measured in other sittings are kept
    kept = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(kept | times, indent=1))
    return times


# -- the paper-scale command --------------------------------------------------------------------

PAPER = """The grid at paper scale, on a GPU machine (COCO-format data at DATA; no internet needed):

    python benchmarks/study.py --out runs/study-paper --data DATA --device 0 \\
        --seeds 0 1 2 --size 640 --batch-size 16 \\
        --fcos-epochs 12 --tv-epochs 12 --yolo-epochs 100 --hf-epochs 50 \\
        --frameworks fcos tv-fcos yolo hf-deformable

Sizes as in the papers' schedules at a reduced image size (OTA: FCOS-R50 1x = 12 epochs;
YOLOv8n: 100 epochs at 640; a Deformable DETR needs 50). Estimated cost on one H100, from the
per-image step times of the CPU grid scaled by the FLOPs of the larger images and models: FCOS
about 1.5 GPU-h per run on COCO train2017 (15 runs: ~22 GPU-h), torchvision FCOS ~1.5 GPU-h
per run (6: ~9), YOLOv8n ~6 GPU-h per 100 epochs (9: ~54), the tiny Deformable DETR ~4 GPU-h
(6: ~24): about 110 GPU-h for the whole grid; every finished run is kept, so it can be spread
over many sittings. The bundled FCOS here is the reference model at the project's CPU width;
for the paper's R50-FPN pass --fcos-args '--lr 0.01 --depth 50 --channels 256 --head-depth 4'."""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/study")
    p.add_argument(
        "--data", default="", help="a COCO-format dataset (default: crowded Color Boxes)"
    )
    p.add_argument(
        "--frameworks", nargs="+", default=["fcos", "tv-fcos", "yolo"], choices=list(GRID)
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fcos-epochs", type=int, default=8)
    p.add_argument(
        "--fcos-args",
        default="--lr 0.02 --channels 64 --head-depth 2",
        help="further flags of the bundled FCOS runs (its CPU width by default)",
    )
    p.add_argument("--tv-epochs", type=int, default=12)
    p.add_argument("--yolo-epochs", type=int, default=60)
    p.add_argument("--hf-epochs", type=int, default=12)
    p.add_argument("--device", default="cpu", help="cpu, or a CUDA device index (0)")
    p.add_argument("--report", action="store_true", help="only the report of the runs done")
    p.add_argument("--steps", action="store_true", help="only the paired step times (idle machine)")
    p.add_argument("--paper", action="store_true", help="print the paper-scale command and cost")
    args = p.parse_args(argv)
    args.device_torch = "cpu" if args.device == "cpu" else f"cuda:{args.device}"
    args.epoch_scale = args.fcos_epochs / 8
    if args.paper:
        print(PAPER)
        return None
    if args.steps:
        print(json.dumps(step_times(args), indent=1))
        return None
    results = {} if args.report else run_grid(args)
    path = Path(args.out) / "study.json"
    results = json.loads(path.read_text()) if path.exists() else results
    text = report(results, args)
    (Path(args.out) / "study.md").write_text(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()

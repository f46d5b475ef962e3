"""Solve the corpus of real training problems (``capture_corpus.py``): iterations, items that
run out of budget, time against POT, and how soon the assigners' decisions settle.

    python benchmarks/capture_corpus.py --out runs/corpus   # once
    python benchmarks/bench_corpus.py --corpus runs/corpus   # ~5 minutes on 2 cores
    python benchmarks/bench_corpus.py --corpus runs/corpus --no-pot --no-decisions

Per source (``demo``, ``yolo``, ``torchvision``, ``detr``):

* **iterations**: each problem solved as it was in training (``uotmatch.match`` with the call's
  own arguments): items, the median, 99th percentile and largest number of iterations, the items
  that reached ``max_iter``, and the total time;
* **POT**: the same items looped through POT's log-domain Sinkhorn (``ot.sinkhorn(...,
  method="sinkhorn_log")`` for balanced problems, ``ot.unbalanced.sinkhorn_unbalanced``
  otherwise, numpy float64, stopping when its own criterion reaches the item's ``tol``, at most
  ``--pot-max-iter`` iterations): the time, and how many of its plans reach ``tol`` by our error
  (``uotmatch._state.plan_error``, the relative L1 violation of the optimality conditions);
* **decisions**: the assignment each item's plan decodes to (the OTA assigners' official
  decoding, ``uotmatch.detection.decode_plan``; the DETR matchers' default, ``"hungarian"``) at
  looser tolerances, against a float64 solve to ``1e-10``: the anchors (queries) assigned
  differently, and the time. Ties apart: an anchor whose two best scores in the reference differ
  by less than ``TIE`` (relative), or a matching that carries the reference plan's mass as the
  reference's does, is decided by index order, whatever the tolerance. The same for
  ``UOTMatcher`` on generated DETR batches of 100 and 300 queries (random, near-identical and
  near-target queries; ``--matcher-seeds`` of each). The assigners' default ``tol``
  (``ASSIGNER_TOL``) and the matcher's (``MATCHER_TOL``) are the loosest with 0 changes.

Measure on an idle machine (``uptime`` load under 1.5): the times are sums over many small
solves, whose per-operation overhead is what a loaded machine slows first.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import ot
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uotmatch  # noqa: E402
from uotmatch._state import plan_error  # noqa: E402
from uotmatch.detection import decode_plan  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_assigners import detr_batch  # noqa: E402

INF = math.inf
OTA_SOURCES = ("demo", "yolo", "torchvision")
TOLERANCES = (1e-1, 3e-2, 1e-2, 1e-3, 1e-4, 5e-5, 1e-5)
REFERENCE_TOL = 1e-10
#: Problems of each source solved once, untimed, before its timed pass: a source's first calls
#: (new shapes, dtypes and paths) cost several times a warm one, which a ``--limit 4`` run
#: would otherwise mostly measure (DETR: 18 ms for 4 problems cold, 3 ms warm).
WARMUP_PROBLEMS = 4


def load(corpus: Path) -> dict[str, list[dict]]:
    """``{source: problems}`` of every ``*.pt`` in ``corpus``."""
    out = {}
    for path in sorted(corpus.glob("*.pt")):
        data = torch.load(path, weights_only=True)
        out[data["source"]] = data["problems"]
    if not out:
        raise SystemExit(f"no corpus in {corpus}: run benchmarks/capture_corpus.py --out {corpus}")
    return out


def solve(problem: dict, **override) -> uotmatch.Matching:
    """``match`` on a captured problem with the call's own arguments and solver options (a
    corpus captured before ``SolverOptions.method`` existed replays with ``"auto"``), some of
    them overridden."""
    kw = {k: v for k, v in problem.items() if k not in ("cost", "eps", "tau1", "tau2", "step")}
    kw.update(override)
    names = [f.name for f in dataclasses.fields(uotmatch.SolverOptions)]
    solver = uotmatch.SolverOptions(**{k: kw.pop(k) for k in names if k in kw})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return uotmatch.match(
            problem["cost"], problem["eps"], problem["tau1"], problem["tau2"], solver=solver, **kw
        )


def items(problem: dict):
    """Per batch item: ``(C [M, N(+1)], a [M], b [N(+1)])`` as float64 numpy, the masked columns
    left out and the background column (mass ``max(sum a - sum b, 0)``) appended."""
    C = problem["cost"].double()
    B, M, N = C.shape
    a = problem.get("a")
    a = torch.ones(B, M) if a is None else a.expand(B, M)
    b = problem.get("b")
    b = torch.ones(B, N) if b is None else b.expand(B, N)
    mask = problem.get("gt_mask")
    mask = torch.ones(B, N, dtype=torch.bool) if mask is None else mask.expand(B, N)
    bg = problem.get("background_cost")
    for i in range(B):
        ai, bi, ci = a[i].double(), b[i].double()[mask[i]], C[i][:, mask[i]]
        if bg is not None:
            bgi = torch.as_tensor(bg, dtype=torch.float64).expand(B, M)[i]
            ci = torch.cat([ci, bgi[:, None]], 1)
            bi = torch.cat([bi, (ai.sum() - bi.sum()).clamp_min(0)[None]])
        yield ci.numpy(), ai.numpy(), bi.numpy()


def iterations_row(source: str, problems: list[dict]) -> tuple[dict, list]:
    its, at_max, n_items = [], 0, 0
    for p in problems[:WARMUP_PROBLEMS]:  # a source's first calls pay for torch's warm-up
        solve(p)
    start = time.perf_counter()
    results = [solve(p) for p in problems]
    seconds = time.perf_counter() - start
    for m in results:
        it = m.iterations.reshape(-1).tolist()
        its += it
        status = m.status if isinstance(m.status, list) else [m.status]
        at_max += sum(s == "max_iter" for s in status)
        n_items += len(it)
    q = np.quantile(its, [0.5, 0.99])
    row = {
        "source": source,
        "problems": len(problems),
        "items": n_items,
        "median": float(q[0]),
        "p99": float(q[1]),
        "max": max(its),
        "at max_iter": at_max,
        "ours s": seconds,
    }
    return row, results


def pot_row(problems: list[dict], results: list, max_iter: int) -> dict:
    start = time.perf_counter()
    plans = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in problems:
            tau1, tau2, eps = p["tau1"], p["tau2"], p["eps"]
            tol = p.get("tol", uotmatch.SolverOptions().tol)
            for C, a, b in items(p):
                if math.isinf(tau1) and math.isinf(tau2):
                    P = ot.sinkhorn(
                        a, b, C, eps, method="sinkhorn_log", numItermax=max_iter,
                        stopThr=tol * a.sum(),
                    )  # fmt: skip
                else:
                    P = ot.unbalanced.sinkhorn_unbalanced(
                        a, b, C, eps, (tau1, tau2), method="sinkhorn_stabilized",
                        numItermax=max_iter, stopThr=tol,
                    )  # fmt: skip
                plans.append((P, C, a, b, tau1, tau2, eps, tol))
    seconds = time.perf_counter() - start
    reached = 0
    for P, _, a, b, tau1, tau2, _, tol in plans:
        P = torch.from_numpy(np.nan_to_num(P))[None]
        r, c = P.sum(-1).clamp_min(1e-300), P.sum(-2).clamp_min(1e-300)
        # POT returns no potentials: the ones its plan's marginals imply, for the finite taus.
        f = torch.zeros_like(r) if math.isinf(tau1) else -tau1 * (r / torch.from_numpy(a)).log()
        g = torch.zeros_like(c) if math.isinf(tau2) else -tau2 * (c / torch.from_numpy(b)).log()
        err = plan_error(P, f, g, torch.from_numpy(a)[None], torch.from_numpy(b)[None], tau1, tau2)
        reached += int(float(err) <= tol)
    return {"POT s": seconds, "POT reached tol": reached, "POT items": len(plans)}


#: A reference decision whose top two scores differ by less than this (relative) is a tie: no
#: tolerance short of the reference's own settles it, and its index order decides it.
TIE = 1e-9


def _matching_changes(index: torch.Tensor, ref: torch.Tensor, ref_plan: torch.Tensor):
    """``(changed, items changed, ties)``: the queries a DETR matcher's pairs ``index [B, Q]``
    give otherwise than the reference's ``ref``. An item's changes are ties when its matching
    carries as much of the reference plan's mass as the reference matching (to ``TIE``)."""
    changed = items = ties = 0
    P = ref_plan.double()
    for b in range(index.shape[0]):
        d = int((index[b] != ref[b]).sum())
        if not d:
            continue
        mass = []
        for ix in (index[b], ref[b]):
            q = torch.nonzero(ix >= 0).flatten()
            mass.append(float(P[b, q, ix[q]].sum()))
        if abs(mass[0] - mass[1]) <= TIE * mass[1]:
            ties += d
        else:
            changed, items = changed + d, items + 1
    return changed, items, ties


def decisions(source: str, problems: list[dict]) -> list[dict]:
    """Per tolerance: the items' decoded assignments against the float64 reference, on the rows
    with mass (a padded row is no anchor), ties apart.

    The OTA sources by the official decoding (a tie: an anchor's two best scores within ``TIE``);
    DETR's by the matchers' default, ``"hungarian"`` (a tie: a matching of the reference's mass).
    """

    def decode(m, p) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decision of each row (-1: background or padding) and, for OTA, its margin: the
        relative gap between the two best scores it was chosen by (None for DETR's matching)."""
        plan = m.plan.double()
        B = plan.shape[0]
        if source in OTA_SOURCES:  # the anchors left out of the solve are background: scale 1
            index = decode_plan(plan, "official", torch.ones(B, dtype=plan.dtype))
            scale = plan.amax(1, keepdim=True)
            scale[:, 0, -1] = scale[:, 0, -1].clamp_min(1.0)
            scores = plan / scale.clamp_min(1e-300)
            top = scores.topk(min(2, scores.shape[-1]), dim=-1).values
            margin = (top[..., 0] - top[..., -1]) / top[..., 0].clamp_min(1e-300)
        else:
            index, margin = m.gt_index("hungarian"), None
        a = p.get("a")
        real = torch.ones_like(index, dtype=torch.bool) if a is None else (a > 0).expand_as(index)
        if margin is not None:
            margin = torch.where(real, margin, float("inf"))
        return torch.where(real, index, -1), margin

    refs = []
    for p in problems:
        ref = {**p, "cost": p["cost"].double()}
        for key in ("a", "b", "background_cost"):
            if isinstance(ref.get(key), torch.Tensor):
                ref[key] = ref[key].double()
        m_ref = solve(ref, tol=REFERENCE_TOL, max_iter=100_000)
        refs.append((*decode(m_ref, p), m_ref.plan))
    rows = []
    for tol in TOLERANCES:
        changed = items_changed = ties = 0
        its = []
        start = time.perf_counter()
        ms = [solve(p, tol=tol) for p in problems]
        seconds = time.perf_counter() - start
        for m, p, (ref, margin, ref_plan) in zip(ms, problems, refs, strict=True):
            index = decode(m, p)[0]
            diff = index != ref
            if margin is not None:  # OTA: per anchor
                tie = margin < TIE
                changed += int((diff & ~tie).sum())
                ties += int((diff & tie).sum())
                items_changed += int((diff & ~tie).reshape(diff.shape[0], -1).any(-1).sum())
            else:
                c, i, t = _matching_changes(index, ref, ref_plan)
                changed, items_changed, ties = changed + c, items_changed + i, ties + t
            its += m.iterations.reshape(-1).tolist()
        rows.append(
            {
                "tol": tol,
                "changed": changed,
                "items changed": items_changed,
                "ties flipped": ties,
                "median its": statistics.median(its),
                "max its": max(its),
                "s": seconds,
            }
        )
    return rows


def _near_identical(B: int, Q: int, G: int, seed: int):
    """A DETR batch at initialisation: every query the same box and logits, up to 1e-3."""
    outputs, targets = detr_batch(B, Q, G, seed)
    g = torch.Generator().manual_seed(seed)
    K = outputs["pred_logits"].shape[-1]
    outputs["pred_logits"] = torch.randn(1, 1, K, generator=g) + 1e-3 * torch.randn(
        B, Q, K, generator=g
    )
    outputs["pred_boxes"] = torch.tensor([0.5, 0.5, 0.2, 0.2]) + 1e-3 * torch.rand(
        B, Q, 4, generator=g
    )
    return outputs, targets


def _near_targets(B: int, Q: int, G: int, seed: int):
    """A DETR batch later in training: three queries near each target (box within 0.02, its
    class up to 4 logits higher), the rest random."""
    outputs, targets = detr_batch(B, Q, G, seed)
    g = torch.Generator().manual_seed(seed)
    for b, t in enumerate(targets):
        n = len(t["boxes"])
        for k in range(min(3 * n, Q)):
            outputs["pred_boxes"][b, k] = t["boxes"][k % n] + 0.02 * torch.randn(4, generator=g)
            boost = 4.0 * float(torch.rand(1, generator=g))
            outputs["pred_logits"][b, k, t["labels"][k % n]] += boost
    return outputs, targets


#: The generated DETR batches of :func:`matcher_decisions`: ``(name, make, B, Q, seeds / n)``,
#: 30 targets at most per image (``bench_assigners.detr_batch``).
MATCHER_BATCHES = (
    ("random init", detr_batch, 4, 100, 1),
    ("random init", detr_batch, 16, 300, 3),
    ("near-identical queries", _near_identical, 4, 100, 1),
    ("queries near targets", _near_targets, 4, 100, 1),
)


def matcher_decisions(seeds: int) -> list[dict]:
    """Per tolerance: ``UOTMatcher``'s pairs (its defaults but ``tol``) on generated batches,
    against the same cost solved in float64 to ``REFERENCE_TOL``: the queries paired
    differently, ties apart."""
    from uotmatch.detection import UOTMatcher

    batches = []
    for name, make, B, Q, per in MATCHER_BATCHES:
        for seed in range(max(1, seeds // per)):
            batches.append((f"{name} {B}x{Q}", *make(B, Q, 30, seed)))
    reference = UOTMatcher(tol=REFERENCE_TOL, max_iter=100_000)
    refs = []
    for _, outputs, targets in batches:  # the same (float32) cost, solved in float64
        C, t = reference.cost(outputs, targets)
        m = reference.solve_cost(C.double(), t.gt_mask)
        refs.append((m.gt_index("hungarian"), m.plan))
    rows = []
    for tol in TOLERANCES:
        matcher = UOTMatcher(tol=tol)
        row: dict = {"tol": tol, **{name: 0 for name, _, _ in batches}}
        its = []
        for (name, outputs, targets), (ref, plan) in zip(batches, refs, strict=True):
            m = matcher.solve(outputs, targets)
            changed, _, _ = _matching_changes(m.gt_index("hungarian"), ref, plan)
            row[name] += changed
            its += m.iterations.tolist()
        row["median its"], row["max its"] = statistics.median(its), max(its)
        rows.append(row)
    return rows


def markdown(rows: list[dict], floats: str = "{:.3g}") -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [floats.format(v) if isinstance(v, float) else str(v) for v in r.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", type=Path, default=Path("runs/corpus"))
    p.add_argument("--sources", nargs="+", default=None, help="default: every source captured")
    p.add_argument("--pot", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--pot-max-iter", type=int, default=10_000)
    p.add_argument("--decisions", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--limit", type=int, default=None, help="at most this many problems a source")
    p.add_argument(
        "--matcher-seeds",
        type=int,
        default=10,
        help="generated DETR batches per kind for the matcher's decisions (0: none)",
    )
    args = p.parse_args(argv)
    corpus = load(args.corpus)
    torch.manual_seed(0)
    for problems in corpus.values():  # warm-up: the first calls pay for allocations
        solve(problems[0])
    text, rows = [], []
    for source, problems in corpus.items():
        if args.sources and source not in args.sources:
            continue
        problems = problems[: args.limit]
        print(f"{source}: {len(problems)} problems", flush=True)
        row, results = iterations_row(source, problems)
        if args.pot:
            row.update(pot_row(problems, results, args.pot_max_iter))
            row["speed-up"] = row["POT s"] / row["ours s"]
        rows.append(row)
        if args.decisions:
            dec = decisions(source, problems)
            what = "anchors" if source in OTA_SOURCES else "queries"
            text.append(f"Decisions, {source} ({what} assigned differently from the reference):")
            text.append(markdown(dec))
    if args.decisions and args.matcher_seeds:
        text.append(
            "Decisions, UOTMatcher on generated DETR batches (queries paired differently from "
            "the reference, its default decoding):"
        )
        text.append(markdown(matcher_decisions(args.matcher_seeds)))
    text.insert(0, markdown(rows))
    out = "\n\n".join(text)
    print(out)
    (args.corpus / "corpus.md").write_text(out + "\n")
    return out


if __name__ == "__main__":
    main()

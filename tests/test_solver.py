"""The solver on the problems real training makes: nearly tight and exactly tight supplies,
near-ties at small eps, light unbalanced plans; Newton's stages against the scaling sweeps.

The *reduced item* is the shape of an OTA problem from a crowded YOLO batch after
``OTAAssigner`` keeps the candidate anchors only: 145 anchors against 25 ground truths and the
background, eps 0.1, each ground truth's supply cut to what its candidates can carry (a maximum
flow), several ground truths sharing a few anchors. At the supply scale 1.0 some of them are
exactly tight: the optimum's potentials lie at infinity, and scaling sweeps crawl toward it by
``eps x error`` per sweep.
"""

import math

import numpy as np
import ot
import pytest
import torch

import uotmatch
from tests.reference import uot_log_domain, uot_optimality_residual
from uotmatch._solver import solve
from uotmatch._state import Marginal
from uotmatch.detection._ota import feasible_supplies

INF = math.inf


def reduced_item(scale: float, seed: int = 0, A: int = 145, G: int = 25):
    """Cost ``[1, A, G]`` (``+inf`` outside each ground truth's candidates), background
    ``[1, A]`` and supplies ``[1, G]``: the supplies a maximum flow lets the candidates carry,
    times ``scale``. Twenty small ground truths in five clusters share seven anchors per
    cluster (1 to 4 candidates each, supplies 1 to 3: more than the cluster can carry), five
    large ones have the other anchors."""
    g = torch.Generator().manual_seed(seed)
    candidate = torch.zeros(A, G, dtype=torch.bool)
    order = torch.randperm(A, generator=g)
    pools, rest = order[:35].view(5, 7), order[35:]
    for j in range(20):
        pool = pools[j % 5]
        n = int(torch.randint(1, 5, (1,), generator=g))
        candidate[pool[torch.randperm(7, generator=g)[:n]], j] = True
    for j, part in enumerate(rest.chunk(5)):
        candidate[part, 20 + j] = True
    iou = torch.rand(A, G, generator=g) * 0.8 + 0.1
    cost = torch.rand(A, G, generator=g) * 2 + 1.5 * -iou.log()
    cost = cost.masked_fill(~candidate, INF)
    background = torch.rand(A, generator=g) * 0.5 + 0.3
    k = torch.randint(1, 4, (G,), generator=g).float()
    k[20:] = 5.0
    k = feasible_supplies(k[None], candidate[None])[0]
    return cost[None], background[None], (k * scale)[None], candidate


def test_the_reduced_item_is_exactly_tight_at_scale_one():
    """The fixture's premise: some group of ground truths needs every unit its candidates have
    (a maximum flow saturates them), so no feasible plan gives those anchors any background."""
    _, _, k, candidate = reduced_item(1.0)
    more = feasible_supplies(k + 0.5, candidate[None])  # what the candidates can carry at most
    assert bool((more < k + 0.5).any())  # some supplies cannot grow: a tight group


@pytest.mark.parametrize(
    "scale, budget",
    [(0.9, 100), (0.99, 1000), (0.999, 1000), (1.0, 200)],
)
@pytest.mark.parametrize("method", ["auto", "sweeps"])
def test_the_reduced_item_converges(scale, budget, method):
    """Supplies with 10%, 1%, 0.1% and no slack: Newton's stages (``"auto"`` on a problem this
    small), or the sweeps handing their slow items to Newton (``"sweeps"``), converge within the
    budget, to tol 1e-5, with a plan on the candidates only (the sweeps alone: next test)."""
    cost, background, k, candidate = reduced_item(scale)
    solver = uotmatch.SolverOptions(max_iter=budget, tol=1e-5, method=method)
    m = uotmatch.match(cost, 0.1, b=k, background_cost=background, solver=solver)
    assert bool(m.converged), (m.status, m.marginal_error)
    assert int(m.iterations) <= budget
    assert torch.isfinite(m.plan).all()
    assert float(m.plan[0, :, :-1][~candidate].sum()) == 0.0
    real = m.plan[0, :, :-1].sum(0)
    torch.testing.assert_close(real, k[0], atol=1e-4 * float(k.sum()), rtol=0)


def test_the_sweeps_alone_crawl_on_the_reduced_item():
    """Why Newton: on the reduced item the scaling sweeps alone (Newton off) need 120, 429 and
    2379 iterations at 10%, 1% and 0.1% slack, and do not converge at all when it is exactly
    tight; Newton's stages take 18, 13, 13 and 10."""
    cost, background, k, _ = reduced_item(0.999)
    full = torch.cat([cost, background[..., None]], -1).mT.contiguous().double()  # [1, G+1, A]
    cols = Marginal(torch.ones(1, cost.shape[1], dtype=torch.float64), INF)
    rows = Marginal(torch.cat([k, (cost.shape[1] - k.sum(-1, keepdim=True))], -1).double(), INF)
    with torch.no_grad():
        out = solve(full, rows, cols, eps=0.1, max_iter=2000, tol=1e-5, newton=False)
        assert not bool(out.converged) and int(out.iterations) == 2000
        out = solve(full, rows, cols, eps=0.1, max_iter=2000, tol=1e-5)  # with Newton
        assert bool(out.converged) and int(out.iterations) < 30


@pytest.mark.parametrize("seed", range(12))
def test_random_problems_with_ten_percent_slack_need_few_iterations(seed):
    """Random balanced problems with forbidden pairs whose tight supply sets keep 10% slack
    (supplies 0.9 x a maximum flow): no item needs more than 300 iterations."""
    g = torch.Generator().manual_seed(seed)
    B, A, G = 4, int(torch.randint(20, 200, (1,), generator=g)), int(torch.randint(2, 30, (1,)))
    candidate = torch.rand(B, A, G, generator=g) < torch.rand(1, generator=g) * 0.2 + 0.02
    candidate[:, 0, :] = True  # every ground truth has a candidate
    cost = (torch.rand(B, A, G, generator=g) * 5).masked_fill(~candidate, INF)
    k = torch.randint(1, 8, (B, G), generator=g).float()
    k = feasible_supplies(k, candidate) * 0.9
    background = torch.rand(B, A, generator=g) + 0.2
    eps = float(torch.tensor([0.01, 0.05, 0.1, 0.5])[seed % 4])
    m = uotmatch.match(cost, eps, b=k, background_cost=background, max_iter=300)
    assert bool(m.converged.all()), (m.iterations, m.marginal_error)


def test_an_exactly_tight_two_by_two_converges():
    """``[[0.1, inf], [0.5, 0.2]]``: prediction 0 can only go to ground truth 0, which has no
    room left for prediction 1; the optimum's potentials lie at infinity. It ran to max_iter
    (error 3e-4) before the Newton stages."""
    m = uotmatch.match(torch.tensor([[0.1, INF], [0.5, 0.2]]), 0.1)
    assert bool(m.converged) and int(m.iterations) < 30
    torch.testing.assert_close(m.plan, torch.eye(2), atol=1e-4, rtol=0)


def test_a_light_plan_is_accurate_to_tol_of_itself():
    """Issue 19's example: a plan of mass 1.5e-8 was reported converged at 2.35e-10 after three
    iterations, because the error was relative to the masses ``a``, ``b``. It is now relative
    to the plan's own mass, and the value is POT's."""
    m = uotmatch.match([[200.0]], eps=1, tau1=10, tau2=0.1)
    expected = ot.unbalanced.sinkhorn_unbalanced(
        np.ones(1), np.ones(1), np.array([[200.0]]), 1.0, (10.0, 0.1), stopThr=1e-15
    )
    assert m.status == "converged"
    assert m.plan[0][0] == pytest.approx(float(expected[0, 0]), rel=1e-4)
    assert m.plan[0][0] == pytest.approx(1.4958e-8, rel=1e-3)


@pytest.mark.parametrize("seed", range(6))
def test_light_unbalanced_plans_are_exact(seed):
    """Costs far above eps + tau1 + tau2: plans of mass 1e-3 down to 1e-20, each within 1e-6 of
    its own mass of the optimality conditions and of a plain log-domain fixed-point iteration
    run to its end (POT's scaling loop stops short on such plans: on the problems of an earlier
    version of this test its plans missed the optimality conditions by 40% to 70% of their
    mass), and converged."""
    rng = np.random.default_rng(seed)
    M, N = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    tau1, tau2 = float(rng.choice([0.1, 1.0, 5.0])), float(rng.choice([0.1, 1.0, 5.0]))
    C = rng.uniform(20, 60, (M, N)) * (1.0 + tau1 + tau2) / 2
    a, b = rng.uniform(0.5, 2, M), rng.uniform(0.5, 2, N)
    m = uotmatch.match(torch.tensor(C), 1.0, tau1, tau2, a=a, b=b, tol=1e-8, max_iter=5000)
    assert bool(m.converged), (m.marginal_error, m.iterations)
    P = m.plan.numpy()
    mass = P.sum()
    assert 1e-40 < mass < 1e-3
    assert uot_optimality_residual(P, C, a, b, 1.0, tau1, tau2) < 1e-6
    expected = uot_log_domain(C, a, b, 1.0, tau1, tau2, iterations=5000)
    np.testing.assert_allclose(P, expected, atol=1e-6 * mass, rtol=0)


@pytest.mark.parametrize("taus", [(INF, INF), (1.0, 1.0), (INF, 0.5), (10.0, INF)])
def test_newton_stages_and_scaling_sweeps_agree(taus):
    """The same fixed point, whichever stages run: Newton's (float64, log domain) and the
    sweeps' (Newton off), and the sweeps handing their items to Newton."""
    g = torch.Generator().manual_seed(3)
    C = torch.rand(3, 12, 5, generator=g, dtype=torch.float64) * 3
    full = torch.cat([C, torch.full((3, 12, 1), 1.5, dtype=torch.float64)], -1)
    rows = Marginal(torch.ones(3, 12, dtype=torch.float64), taus[0])
    cols = Marginal(torch.tensor([[2.0] * 5 + [2.0]] * 3, dtype=torch.float64), taus[1])
    with torch.no_grad():
        plans = []
        for newton in (None, False):
            out = solve(full.mT, cols, rows, eps=0.05, max_iter=5000, tol=1e-12, newton=newton)
            assert bool(out.converged.all())
            plans.append(out.plan)
    torch.testing.assert_close(plans[0], plans[1], atol=1e-9, rtol=0)


def test_mass_levels_of_the_warm_start():
    """The warm start's mass level of a heavy line: the smallest reduced cost at which its
    cheapest lines of the other side hold its mass (a loop over sorted entries, by hand), its
    minimum for a line its cheapest entry holds or whose finite entries cannot hold it."""
    from uotmatch._schedule import _levels

    g = torch.Generator().manual_seed(0)
    B, L, K = 3, 5, 9
    reduced = torch.rand(B, L, K, generator=g, dtype=torch.float64) * 4
    reduced[0, 1, 3:] = math.inf  # three finite entries only
    other = torch.rand(B, K, generator=g, dtype=torch.float64) + 0.5  # masses 0.5 to 1.5
    alive = torch.ones(B, K, dtype=torch.bool)
    alive[2, 0] = False  # a dead line of the other side holds nothing
    mass = torch.rand(B, L, generator=g, dtype=torch.float64) * 6
    mass[0, 0] = 0.1  # lighter than every line of the other side: its minimum
    mass[0, 1] = 100.0  # more than its finite entries hold: its minimum
    levels = _levels(reduced, mass, other, alive)
    for b in range(B):
        for i in range(L):
            expected = float(reduced[b, i].min())
            if mass[b, i] > float((other[b] * alive[b]).max()):
                held = 0.0
                for j in np.argsort(reduced[b, i].numpy(), kind="stable"):
                    if not math.isfinite(float(reduced[b, i, j])):
                        break
                    held += float(other[b, j]) if alive[b, j] else 0.0
                    if held >= float(mass[b, i]) * (1 - 1e-9):
                        expected = float(reduced[b, i, j])
                        break
            assert float(levels[b, i]) == expected, (b, i)
    assert float(levels[0, 0]) == float(reduced[0, 0].min())
    assert float(levels[0, 1]) == float(reduced[0, 1].min())
    assert (levels > reduced.amin(-1)).sum() >= 5  # the heavy lines start above their minimum


@pytest.mark.parametrize("shape", [(7, 30, 50), (7, 50, 30)])
def test_the_warm_start_in_chunks_is_the_c_transform(shape, monkeypatch):
    """Reduced a few items at a time (a large cost), the warm start is the same c-transform as
    from one temporary: the longer side's minima, the other side's minima of the reduced cost
    (a loop over items, by hand), forbidden pairs and dead lines included."""
    from uotmatch import _schedule

    g = torch.Generator().manual_seed(2)
    cost = torch.rand(shape, generator=g, dtype=torch.float64) * 3
    cost[1, :, 4] = math.inf  # a dead column
    cost[2, 3, :] = math.inf  # a dead row
    cost[3, 5, 6] = math.inf  # a forbidden pair
    row_min, col_min = cost.amin(-1), cost.amin(-2)
    args = (cost, row_min, col_min, row_min < math.inf, col_min < math.inf, 1.0, 1.0, 1.0, 1.0)
    whole = _schedule.warm_start(*args)
    monkeypatch.setattr(_schedule, "CHUNK", 2 * shape[1] * shape[2])  # two items per chunk
    chunked = _schedule.warm_start(*args)
    for x, y in zip(whole, chunked, strict=True):
        assert torch.equal(x, y)
    f, g_ = chunked
    for b in range(shape[0]):  # by hand
        if shape[2] >= shape[1]:  # columns longer: their minima, then the rows'
            expected_g = torch.where(col_min[b] < math.inf, col_min[b], 0.0)
            expected_f = (cost[b] - expected_g).amin(-1)
            expected_f = torch.where(expected_f < math.inf, expected_f, 0.0)
        else:
            expected_f = torch.where(row_min[b] < math.inf, row_min[b], 0.0)
            expected_g = (cost[b] - expected_f[:, None]).amin(0)
            expected_g = torch.where(expected_g < math.inf, expected_g, 0.0)
        assert torch.equal(f[b], expected_f) and torch.equal(g_[b], expected_g), b


def test_mass_level_warm_start_takes_fewer_iterations():
    """On balanced problems with a background column (the background line heavy), the solve
    from the mass levels converges to the same plan as one from plain minima (the warm start
    changes the start, not the answer), in fewer iterations in total."""
    from uotmatch import _state

    g = torch.Generator().manual_seed(1)
    costs = [
        torch.rand(8, int(m), int(n), generator=g) * 1.5 for m, n in [(20, 4), (40, 9), (60, 3)]
    ]
    plans, its = {}, {}
    original = _state.warm_start
    for levels in (True, False):
        if not levels:  # the same solve with the plain minima
            _state.warm_start = lambda *args, masses=None: original(*args)
        try:
            ms = [uotmatch.match(C, 0.05, background_cost=0.8, tol=1e-9) for C in costs]
        finally:
            _state.warm_start = original
        plans[levels] = [m.plan for m in ms]
        its[levels] = sum(int(m.iterations.sum()) for m in ms)
    for a, b in zip(plans[True], plans[False], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert its[True] < its[False], its


def _sweeps(cost, bg, b, tol):
    """The scaling sweeps alone (Newton off) on ``cost [B, M, N]`` + background, transposed as
    ``match`` solves a tall problem: ``(plan [B, N + 1, M], iterations [B])``."""
    full = torch.cat([cost, bg.unsqueeze(-1)], -1).mT.contiguous()
    a = torch.ones(cost.shape[:2], dtype=cost.dtype)
    cols = torch.cat([b, (a.sum(-1) - b.sum(-1))[:, None]], -1)
    with torch.no_grad():
        out = solve(
            full, Marginal(cols, INF), Marginal(a, INF), eps=0.1, max_iter=500, tol=tol,
            check_every=1, newton=False,
        )  # fmt: skip
    assert bool(out.converged.all())
    return out.plan, out.iterations


def test_fast_items_continue_by_plain_sweeps(monkeypatch):
    """Dense random costs (every anchor near every ground truth, the benchmark's dense row):
    plain sweeps cut the error about tenfold each, and over-relaxing them only overshoots. The
    first sweep shows it (the rows' miss falls, to 0.2 here), and those items go on plain:
    fewer sweeps than over-relaxed throughout, to the same plan as POT's. A slowly converging
    OTA-like item (the reduced item, supplies at 0.9) keeps its over-relaxation."""
    from uotmatch import _sinkhorn

    g = torch.Generator().manual_seed(0)
    iou = torch.rand(3, 2000, 20, generator=g, dtype=torch.float64) * 0.9 + 0.05
    cost = torch.rand(3, 2000, 20, generator=g, dtype=torch.float64) * 2 - 1.5 * iou.log()
    bg = torch.rand(3, 2000, generator=g, dtype=torch.float64) * 0.5
    b = torch.ones(3, 20, dtype=torch.float64)
    plan, its = _sweeps(cost, bg, b, 1e-8)
    monkeypatch.setattr(_sinkhorn, "FAST_FALL", 0.0)  # never fast: over-relaxed throughout
    relaxed_plan, relaxed_its = _sweeps(cost, bg, b, 1e-8)
    assert 2 * int(its.max()) < int(relaxed_its.max()), (its, relaxed_its)  # 9 against 24
    torch.testing.assert_close(plan, relaxed_plan, atol=1e-6, rtol=0)
    full = torch.cat([cost, bg.unsqueeze(-1)], -1)
    a = torch.ones(2000, dtype=torch.float64)
    reference = ot.sinkhorn(
        a.numpy(), torch.cat([b[0], (a.sum() - b[0].sum())[None]]).numpy(), full[0].numpy(),
        0.1, stopThr=1e-11, numItermax=10_000,
    )  # fmt: skip
    np.testing.assert_allclose(plan[0].mT.numpy(), reference, atol=1e-6)
    monkeypatch.undo()

    weights = []
    original = _sinkhorn.check

    def spy(s, st, last, stage_start):
        weights.append(float(st.omega.min()))
        return original(s, st, last, stage_start)

    monkeypatch.setattr(_sinkhorn, "check", spy)
    C, background, k, _ = reduced_item(0.9)
    _sweeps(C.double(), background.double(), k.double(), 1e-3)
    assert weights[1] == _sinkhorn.OMEGA, weights  # after the first sweep's decision


def test_the_sweeps_method_solves_small_problems_by_sweeps(monkeypatch):
    """``SolverOptions(method="sweeps")``: a small well-conditioned problem (a DETR-like
    matching, unit masses and a background) is solved by scaling sweeps alone, to the plan of
    ``"auto"`` (Newton's stages there) and of POT within tol."""
    from uotmatch import _newton

    steps = []
    monkeypatch.setattr(_newton, "step", lambda *a, **k: steps.append(1))  # counted, never run
    g = torch.Generator().manual_seed(4)
    C = torch.rand(3, 40, 6, generator=g, dtype=torch.float64)
    sweeps = uotmatch.match(C, 0.05, background_cost=0.5, solver=uotmatch.SolverOptions(
        tol=1e-9, method="sweeps"))  # fmt: skip
    assert bool(sweeps.converged.all()) and not steps
    monkeypatch.undo()
    auto = uotmatch.match(C, 0.05, background_cost=0.5, tol=1e-9)
    torch.testing.assert_close(sweeps.plan, auto.plan, atol=1e-7, rtol=0)
    b = np.array([1.0] * 6 + [34.0])
    full = torch.cat([C[0], torch.full((40, 1), 0.5, dtype=torch.float64)], -1).numpy()
    ref = ot.sinkhorn(np.ones(40), b, full, 0.05, method="sinkhorn_log", stopThr=1e-12)
    np.testing.assert_allclose(sweeps.plan[0].numpy(), ref, atol=1e-7)


def test_small_problems_keep_newtons_schedule_under_the_sweeps_method():
    """A small problem whose cost range is many times eps (a DETR matching cost not normalised:
    4.5 to 8.5 at eps 0.05) needs no eps-scaling stages of ten sweeps each: under
    ``method="sweeps"`` it keeps Newton's schedule (Newton finishes any item the sweeps crawl
    on): 14 to 21 sweeps per item where the sweeps' own schedule took 84 to 90, to ``"auto"``'s
    plan."""
    g = torch.Generator().manual_seed(2)
    C = torch.rand(8, 10, 3, generator=g, dtype=torch.float64) * 4 + 4.5
    sweeps = uotmatch.match(C, 0.05, background_cost=0.0, solver=uotmatch.SolverOptions(
        tol=1e-6, method="sweeps"))  # fmt: skip
    auto = uotmatch.match(C, 0.05, background_cost=0.0, tol=1e-6)
    assert bool(sweeps.converged.all()) and int(sweeps.iterations.max()) <= 30, sweeps.iterations
    torch.testing.assert_close(sweeps.plan, auto.plan, atol=1e-5, rtol=0)


def test_the_eps_schedule_is_newtons_only_where_newton_could_run_every_stage():
    """Newton's schedule (few stages) for a problem Newton's stages could solve throughout,
    whichever method runs; the sweeps' (halving eps) elsewhere, e.g. a short side of more than
    ``MAX_LINES`` lines, however few entries the cost has."""
    from uotmatch import _newton, _sinkhorn
    from uotmatch._solver import prepare

    g = torch.Generator().manual_seed(0)
    offsets = torch.arange(200, dtype=torch.float64)[:, None] * 0.05  # row minima spread by 10
    wide = torch.rand(1, 200, 300, generator=g, dtype=torch.float64) + offsets  # 200 > MAX_LINES
    narrow = wide[:, :, :100].mT.contiguous()[:, :, :100]  # [1, 100, 100]: Newton-sized

    def stages(cost, **kw):
        rows = Marginal(torch.ones(cost.shape[:2], dtype=cost.dtype), INF)
        cols = Marginal(
            torch.ones(1, cost.shape[2], dtype=cost.dtype) * cost.shape[1] / cost.shape[2], INF
        )
        with torch.no_grad():
            return prepare(cost, rows, cols, 0.001, 1000, 1e-5, None, None, None, **kw).stages

    halving = stages(wide)
    assert len(halving) > 2 and halving[1] / halving[0] == pytest.approx(_sinkhorn.EPS_DECAY)
    for first in (True, False):  # "auto" and "sweeps"
        s = stages(narrow, newton_first=first)
        assert len(s) > 1 and s[1] / s[0] == pytest.approx(_newton.EPS_DECAY), s

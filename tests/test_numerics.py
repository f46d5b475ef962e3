"""Stability: tiny eps, huge costs, forbidden pairs, empty dimensions."""

import math
import warnings

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import uotmatch
from tests.reference import with_background

INF = math.inf


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6])
@pytest.mark.parametrize("taus", [(INF, INF), (100.0, 1.0), (INF, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_eps_and_huge_costs_stay_finite(scale, taus, dtype, device):
    g = torch.Generator().manual_seed(0)
    C = (torch.rand(4, 30, 8, generator=g) * scale).to(dtype=dtype, device=device)
    eps = 1e-4 * scale
    m = uotmatch.match(C, eps, *taus, background_cost=0.5 * scale, max_iter=3000)
    for x in (m.plan, m.f, m.g, m.marginal_error):
        assert torch.isfinite(x).all()
    assert (m.plan >= 0).all()
    # Whether or not every item reached tol, the plan is near the marginals it must have.
    assert float(m.marginal_error.max()) < 1e-2
    if taus == (INF, INF):
        # tiny eps: the decoded matching is the exact Hungarian one on these generic costs
        exact = uotmatch.match(C.double().cpu(), 0.0, background_cost=0.5 * scale)
        agree = (m.gt_index().cpu() == exact.gt_index()).float().mean()
        assert agree > 0.95


def test_penalty_constants_do_not_slow_convergence():
    """OTA-style 1e5 centre-prior penalties are effectively forbidden pairs, not a cost scale."""
    g = torch.Generator().manual_seed(0)
    C = torch.rand(2, 200, 5, generator=g) * 3
    C[:, 50:, :] += 1e5
    m = uotmatch.match(C, 0.1, b=torch.full((5,), 4.0), background_cost=0.5)
    assert bool(m.converged.all()) and int(m.iterations.max()) < 100
    assert float(m.plan[:, 50:, :5].max()) == 0.0


def test_forbidden_pairs_get_exactly_zero(device):
    g = torch.Generator().manual_seed(1)
    C = torch.rand(3, 6, 4, generator=g).to(device)
    forbid = torch.rand(3, 6, 4, generator=g).to(device) < 0.3
    C = C.masked_fill(forbid, INF)
    for taus in [(1.0, 1.0), (INF, 2.0), (INF, INF)]:
        m = uotmatch.match(C, 0.05, *taus, background_cost=1.0)
        assert torch.all(m.plan[..., :4][forbid] == 0)
        assert torch.isfinite(m.plan).all()


@pytest.mark.parametrize("M,N", [(0, 3), (4, 0), (0, 0)])
def test_empty_dimensions(M, N):
    C = torch.rand(2, M, N)
    m = uotmatch.match(C, 0.1, 1.0, 1.0)
    assert m.plan.shape == (2, M, N) and bool(m.converged.all())
    m = uotmatch.match(C, 0.1, 1.0, 1.0, background_cost=0.5)
    assert m.plan.shape == (2, M, N + 1)
    assert m.gt_index().shape == (2, M)
    assert all(len(pred) == 0 and len(gt) == 0 for pred, gt in m.pairs())  # nothing to match
    if N == 0:
        # only the background: every prediction goes there, with the hard marginals too
        m = uotmatch.match(C, 0.1, background_cost=0.5)
        torch.testing.assert_close(m.plan, torch.ones(2, M, 1))
        assert (m.gt_index() == -1).all()
        m = uotmatch.match(C, 0.0, background_cost=0.5)
        torch.testing.assert_close(m.plan, torch.ones(2, M, 1))


def test_more_ground_truths_than_predictions_with_background():
    """N > M: the background has mass 0; with a finite tau2 some ground truths stay unmatched."""
    g = torch.Generator().manual_seed(2)
    C = torch.rand(3, 7, generator=g, dtype=torch.float64)
    m = uotmatch.match(C, 0.05, INF, 1.0, background_cost=0.3, tol=1e-10)
    assert bool(m.converged)
    torch.testing.assert_close(m.plan.sum(1), torch.ones(3, dtype=torch.float64))
    assert float(m.plan[:, -1].sum()) == 0.0  # zero-mass background under tau2 > 0
    exact = uotmatch.match(C, 0.0, INF, 0.0, background_cost=0.3)  # rows to their argmin
    assert (
        exact.gt_index().tolist()
        == np.where(C.min(1).values.numpy() < 0.3, C.argmin(1).numpy(), -1).tolist()
    )


@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize("taus", [(1.0, 1.0), (100.0, 1.0), (INF, INF), (INF, 0.5), (0.0, 1.0)])
def test_reported_error_is_the_returned_plans_error(scale, taus):
    """The error the solver reports is that of the plan it returns (recomputed independently),
    and float32 agrees with float64. Regression: translation steps once went through the
    per-step clamp and silently changed the plan after the last check."""
    from uotmatch._state import plan_error

    g = torch.Generator().manual_seed(0)
    C = torch.rand(4, 30, 8, generator=g, dtype=torch.float64) * scale
    bg = 0.5 * scale
    m64 = uotmatch.match(C, 0.1, *taus, background_cost=bg, tol=1e-9, max_iter=5000)
    m32 = uotmatch.match(C.float(), 0.1, *taus, background_cost=bg, max_iter=5000)
    for m in (m64, m32):  # converged or not (tiny eps balanced may not be, at 1e3)
        P = m.plan.double()
        a = torch.ones(4, 30, dtype=torch.float64)
        b = torch.cat([torch.ones(4, 8), torch.full((4, 1), 22.0)], -1).double()
        recomputed = plan_error(P, m.f.double(), m.g.double(), a, b, *taus)
        torch.testing.assert_close(recomputed, m.marginal_error.double(), atol=2e-6, rtol=0.05)
    # The same unit as the error: L1 difference over the prescribed mass (30 rows of mass 1).
    both = m32.converged & m64.converged
    assert bool(both.any())
    diff = (m32.plan.double() - m64.plan).abs().sum((1, 2)) / 30
    assert float(diff[both].max()) < 1e-4


# -- honest answers: NaN, infeasibility, any cost scale (each fails on the previous solver) --------


def test_a_plan_beyond_the_dtype_is_an_error_not_a_nan_plan():
    """tau1 = tau2 = 0: the plan is exp(-C / eps) = e^100 for C = -1, eps = 0.01: beyond
    float32's range. float32 refuses with the reason; float64 returns it exactly."""
    with pytest.raises(ValueError, match=r"entries up to 2.69e\+43, beyond the range of .*float32"):
        uotmatch.match(torch.tensor([[-1.0, 0.2]]), 0.01, 0.0, 0.0)
    m = uotmatch.match(torch.tensor([[-1.0, 0.2]], dtype=torch.float64), 0.01, 0.0, 0.0)
    expected = torch.tensor([[math.exp(100), math.exp(-20)]], dtype=torch.float64)
    torch.testing.assert_close(m.plan, expected)
    assert bool(m.converged)


@pytest.mark.parametrize(
    "cost, kwargs, message",
    [  # a ground truth reachable only from predictions of zero mass (tau1 > 0 keeps them empty)
        ([[0.5, 0.5], [INF, 0.5]], dict(tau1=1.0, a=[0.0, 1.0]), "column 0 has mass but no"),
        ([[0.5, 0.5], [INF, 0.5]], dict(a=[0.0, 2.0]), "column 0 has mass but no"),  # balanced
        # a prediction whose only allowed column has zero mass (tau2 > 0 keeps it empty)
        ([[0.5, INF], [0.5, 0.5]], dict(tau2=1.0, b=[0.0, 1.0]), "prediction 0 has mass but no"),
    ],
)
def test_lines_reachable_only_through_zero_mass_are_infeasible(cost, kwargs, message):
    kwargs = {"tau1": INF, "tau2": INF, **kwargs}
    tau1, tau2 = kwargs.pop("tau1"), kwargs.pop("tau2")
    with pytest.raises(ValueError, match=message):
        uotmatch.match(torch.tensor(cost), 0.1, tau1, tau2, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eps_far_below_the_cost_scale_converges_to_the_exact_assignment(dtype):
    """eps / scale = 1e-7: the plan is the exact (eps = 0) matching, and converged says so."""
    C = torch.rand(5, 3, generator=torch.Generator().manual_seed(0)) * 1e6
    m = uotmatch.match(C.to(dtype), 0.1, background_cost=0.5e6)
    exact = uotmatch.match(C.double(), 0.0, background_cost=0.5e6)
    assert bool(m.converged) and m.status == "converged"
    assert m.plan.dtype == dtype
    assert m.gt_index().tolist() == exact.gt_index().tolist() == [2, 0, -1, -1, 1]


@pytest.mark.slow
def test_a_column_of_large_finite_costs_is_served_as_pot_serves_it():
    """The official OTA / YOLOX penalty costs (1e5 - 1e6): a ground truth whose costs are all
    near 1e6 still receives its unit (the c-transform warm start), as POT's log solver says."""
    C = torch.tensor(
        [[0.0, 1e6], [0.0, 1e6 + 0.1], [0.3, 1e6 + 0.2], [0.3, 1e6 + 0.3]], dtype=torch.float64
    )
    m = uotmatch.match(C, 0.1, background_cost=0.5, tol=1e-9)
    assert bool(m.converged)
    full, b = with_background(C.numpy(), np.ones(4), np.ones(2), 0.5)
    expected = ot.sinkhorn(
        np.ones(4), b, full, 0.1, method="sinkhorn_log", stopThr=1e-12, numItermax=100_000
    )
    np.testing.assert_allclose(m.plan.numpy(), expected, atol=1e-7)
    assert float(m.plan[:, 1].sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("tau", [1e10, 1e15, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_taus_with_unequal_masses(tau, dtype):
    """tau1 = tau2 = tau -> inf: the marginals tend to the KL compromise a m / A, b m / B with
    m = sqrt(A B); the solver converges at any tau (it failed from 1e15 on before)."""
    C = torch.rand(5, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)
    m = uotmatch.match(C, 0.1, tau, tau)
    assert bool(m.converged), (m.marginal_error, m.status)
    limit = uotmatch.match(C, 0.1, b=torch.full((3,), 5 / 3, dtype=dtype))  # balanced, A = B
    scale = math.sqrt(5 * 3) / 5
    torch.testing.assert_close(m.plan, limit.plan * scale, atol=2e-5, rtol=0)


def test_costs_beyond_what_float64_resolves_are_reported_not_nan():
    """|C| / eps = 1e39: no dtype resolves eps there. No NaN; status and a warning say why."""
    C = torch.rand(5, 3, generator=torch.Generator().manual_seed(0)) * 1e38
    with pytest.warns(RuntimeWarning, match="did not converge.*precision: eps is below what the"):
        m = uotmatch.match(C, 0.1, background_cost=0.5e38)
    assert torch.isfinite(m.plan).all() and not bool(m.converged) and m.status == "precision"


def test_slow_problems_say_so():
    """Integer costs with ties at eps = 0.1: balanced Sinkhorn (POT's as well) needs ~1e5
    iterations here, Newton's stages about ten. A budget that runs out first says so, in
    ``status`` and a warning."""
    C = torch.tensor([[5.0, 3, 7], [6, 7, 0], [2, 5, 5], [1, 4, 7], [1, 0, 1]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="max_iter: .*max_iter = 3 is small.*--max-iter"):
        m = uotmatch.match(C, 0.1, background_cost=0.0, max_iter=3)
    assert m.status == "max_iter" and not bool(m.converged) and int(m.iterations) == 3
    assert float(m.marginal_error) > 1e-5
    m = uotmatch.match(C, 0.1, background_cost=0.0)
    assert m.status == "converged" and int(m.iterations) < 30


def test_the_warning_names_the_likely_cause():
    """Items that run out of a normal budget: the warning names the cause, whether Newton's
    stages ran (then the masses: no plan carries them) or not (why not), and what to do."""
    # Balanced, a forbidden pair: ground truth 0 needs 1.5, only prediction 0 (mass 1) may send.
    C = torch.tensor([[0.0, 0.0], [INF, 0.5]])
    with pytest.warns(RuntimeWarning, match="likely cause is the masses.*--max-iter"):
        uotmatch.match(C, 0.1, b=torch.tensor([1.5, 0.5]), max_iter=200)
    C = torch.rand(2, 200, 150, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"scaling sweeps only \(the shorter side has 151 >"):
        uotmatch.match(C, 1e-4, background_cost=0.5, max_iter=60)


@st.composite
def hard_problems(draw):
    """Valid problems at every scale: negative costs, integer ties, 1e5 penalties, costs from
    1e-3 to 1e12, eps down to 1e-10 of the scale, taus from 0 to 1e30, float32 and float64."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    B, M, N = draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 5))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3, 1e6, 1e12]))
    shift = draw(st.sampled_from([0.0, -0.5, -3.0]))
    C = rng.uniform(0, 1, (B, M, N)) + shift
    kind = draw(st.sampled_from(["uniform", "integer", "penalty"]))
    if kind == "integer":
        C = np.round(C * 10)
    elif kind == "penalty":
        C = C + 1e5 * (rng.uniform(size=(B, M, N)) < 0.3)
    C = C * scale
    eps = draw(st.sampled_from([1e-4, 1e-2, 0.1, 1.0])) * draw(st.sampled_from([1.0, 1e-6]))
    eps *= scale
    taus = st.sampled_from([0.0, 0.01, 1.0, 100.0, 1e10, 1e30, INF])
    tau1 = draw(taus) * (scale if draw(st.booleans()) else 1.0)
    tau2 = draw(taus) * (scale if draw(st.booleans()) else 1.0)
    a = rng.uniform(0.2, 2.0, (B, M)) if draw(st.booleans()) else np.ones((B, M))
    b = rng.uniform(0.2, 2.0, (B, N)) if draw(st.booleans()) else np.ones((B, N))
    bg = (rng.uniform(0, 1, (B, M)) + shift) * scale if draw(st.booleans()) else None
    if math.isinf(tau1) and math.isinf(tau2):  # feasible: equal mass, or less mass + background
        ratio = a.sum(-1, keepdims=True) / b.sum(-1, keepdims=True)
        b = b * ratio if bg is None else b * np.minimum(1.0, ratio) * 0.9
    return C, a, b, bg, eps, tau1, tau2, draw(st.sampled_from([torch.float32, torch.float64]))


@pytest.mark.slow
@settings(max_examples=200)
@given(hard_problems())
def test_no_nan_plan_and_converged_only_when_the_recomputed_error_is_within_tol(problem):
    """The answer is a finite plan, or a ValueError saying it exceeds the dtype; ``converged``
    is True only where the marginal error recomputed in float64 from the returned plan and
    potentials is within tol (plus the rounding of the returned dtype)."""
    from uotmatch._state import plan_error

    C, a, b, bg, eps, tau1, tau2, dtype = problem

    def t(x):
        return None if x is None else torch.tensor(x, dtype=dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            m = uotmatch.match(t(C), eps, tau1, tau2, a=t(a), b=t(b), background_cost=t(bg))
        except ValueError as exc:
            assert "beyond the range" in str(exc), str(exc)
            return
    assert torch.isfinite(m.plan).all()
    b_full = torch.tensor(b)
    if bg is not None:
        extra = (torch.tensor(a).sum(-1) - b_full.sum(-1)).clamp_min(0)
        b_full = torch.cat([b_full, extra[:, None]], -1)
    a64 = torch.tensor(a)
    # In float64, at the resolution of small masses of the dtype it was solved in.
    err = plan_error(
        m.plan.double(), m.f.double(), m.g.double(), a64, b_full, tau1, tau2, dtype=dtype
    )
    within = err <= 1e-5 + (1e-4 if dtype == torch.float32 else 1e-9)
    assert not bool((m.converged & ~within).any()), (err, m.marginal_error, m.status)
    assert [s == "converged" for s in m.status] == m.converged.tolist()

"""The exact eps = 0 limits and the paper's Figure 1."""

import importlib.util
import itertools
import math
from pathlib import Path

import numpy as np
import ot
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import uotmatch

# The figure's numbers live with the docs' examples (not in the library).
_spec = importlib.util.spec_from_file_location(
    "figure1", Path(__file__).resolve().parents[1] / "docs" / "examples" / "figure1.py"
)
figure1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figure1)

INF = math.inf
seeds = st.integers(0, 2**32 - 1)


def _t(device, x):
    """A numpy array as a float64 tensor on ``device``."""
    return torch.as_tensor(x, dtype=torch.float64, device=device)


def _np(x):
    return x.cpu().numpy()


@given(seeds, st.integers(1, 8), st.integers(1, 6), st.booleans())
def test_nearest_ground_truth_is_row_argmin(device, seed, M, N, with_bg):
    rng = np.random.default_rng(seed)
    C = rng.uniform(0, 1, (M, N))
    a = rng.uniform(0.5, 2, M)
    bg = 0.5 if with_bg else None
    m = uotmatch.match(_t(device, C), 0.0, INF, 0.0, a=_t(device, a), background_cost=bg)
    assert m.plan.device == device
    full = np.c_[C, np.full(M, 0.5)] if with_bg else C
    expected = np.zeros_like(full)
    expected[np.arange(M), full.argmin(1)] = a
    np.testing.assert_array_equal(_np(m.plan), expected)
    np.testing.assert_allclose(_np(m.f), full.min(1))


@given(seeds, st.integers(1, 8), st.integers(1, 6))
def test_best_prediction_is_column_argmin(device, seed, M, N):
    rng = np.random.default_rng(seed)
    C = rng.uniform(0, 1, (M, N))
    b = rng.uniform(0.5, 2, N)
    m = uotmatch.match(_t(device, C), 0.0, 0.0, INF, b=_t(device, b))
    expected = np.zeros_like(C)
    expected[C.argmin(0), np.arange(N)] = b
    np.testing.assert_array_equal(_np(m.plan), expected)


def test_ties_split_evenly():
    C = torch.tensor([[0.2, 0.2, 0.5], [0.1, 0.3, 0.1]])
    m = uotmatch.match(C, 0.0, INF, 0.0)
    torch.testing.assert_close(m.plan, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]]))
    m = uotmatch.match(C.T.contiguous(), 0.0, 0.0, INF)
    torch.testing.assert_close(m.plan, torch.tensor([[0.5, 0.5], [0.5, 0.0], [0.0, 0.5]]))
    # ... which is what a small eps converges to
    soft = uotmatch.match(C.double(), 1e-3, INF, 0.0, tol=1e-12)
    torch.testing.assert_close(
        soft.plan.float(), uotmatch.match(C, 0.0, INF, 0.0).plan, atol=1e-9, rtol=0
    )


@given(seeds, st.integers(1, 7), st.integers(0, 7))
def test_hungarian_limit_equals_scipy(device, seed, M, N):
    """Unit masses + background: each gt to a distinct prediction minimising the total cost."""
    rng = np.random.default_rng(seed)
    N = min(N, M)
    C = rng.uniform(0, 1, (M, N))
    bg = rng.uniform(0, 1, M)
    m = uotmatch.match(_t(device, C), 0.0, background_cost=_t(device, bg))
    assert m.plan.device == device
    plan = _np(m.plan)
    # reference: square problem with the background column replicated M - N times
    square = np.c_[C, np.repeat(bg[:, None], M - N, axis=1)]
    r, c = linear_sum_assignment(square)
    assert np.isclose((plan * np.c_[C, bg]).sum(), square[r, c].sum())
    assert set(np.unique(plan)) <= {0.0, 1.0}
    np.testing.assert_array_equal(plan.sum(1), np.ones(M))
    np.testing.assert_array_equal(plan[:, :N].sum(0), np.ones(N))


@given(seeds, st.integers(1, 7))
def test_square_hungarian_equals_scipy_pairs(device, seed, n):
    rng = np.random.default_rng(seed)
    C = rng.uniform(0, 1, (n, n))
    pred, gt = uotmatch.match(_t(device, C), 0.0).pairs()
    r, c = linear_sum_assignment(C)
    assert pred.tolist() == r.tolist() and gt.tolist() == c.tolist()


@given(seeds, st.integers(1, 6), st.integers(1, 5))
def test_balanced_limit_with_masses_equals_emd(device, seed, M, N):
    rng = np.random.default_rng(seed)
    C = rng.uniform(0, 1, (M, N))
    a = rng.uniform(0.5, 2, M)
    b = rng.uniform(0.5, 2, N)
    b *= a.sum() / b.sum()
    m = uotmatch.match(_t(device, C), 0.0, a=_t(device, a), b=_t(device, b))
    plan, f, g = _np(m.plan), _np(m.f), _np(m.g)
    ref = ot.emd(a, b, C)
    assert np.isclose((plan * C).sum(), (ref * C).sum(), atol=1e-10)
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-10)
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-10)
    # exact duals: f + g <= C everywhere, with equality on the support
    slack = C - f[:, None] - g[None, :]
    assert slack.min() > -1e-9 and np.all(np.abs(slack[plan > 1e-12]) < 1e-9)


def test_forbidden_pairs_in_the_exact_limits(device):
    C = torch.tensor([[INF, 0.3], [0.2, INF], [0.1, 0.1]], device=device)
    m = uotmatch.match(C, 0.0, background_cost=1.0)
    assert m.plan[0, 0] == 0 and m.plan[1, 1] == 0
    # row 2 -> B and row 1 -> A, row 0 to background: 0.1 + 0.2 + 1.0 = 1.3 (vs 1.5 otherwise)
    assert m.gt_index().tolist() == [-1, 0, 1]
    with pytest.raises(ValueError, match="column 1 has mass but no finite-cost prediction"):
        uotmatch.match(torch.tensor([[0.1, INF], [0.2, INF]], device=device), 0.0)
    # every line has a finite entry, yet rows 0 and 1 both need column 0 (Hall's condition fails)
    hall = torch.tensor([[0.1, INF, INF], [0.2, INF, INF], [0.3, 0.3, 0.3]], device=device)
    with pytest.raises(ValueError, match="no feasible plan"):
        uotmatch.match(hall, 0.0)
    with pytest.raises(ValueError, match="no feasible plan"):
        masses = hall.new_tensor([1.0, 1.0, 1.5])
        uotmatch.match(hall, 0.0, a=masses, b=masses)  # the ot.emd path


def _optimality_gap(C):
    """Smallest extra cost of any assignment other than the optimal one (n x n)."""
    n = C.shape[0]
    costs = sorted(C[range(n), list(p)].sum() for p in itertools.permutations(range(n)))
    return costs[1] - costs[0]


@pytest.mark.parametrize("seed", range(5))
def test_small_eps_decodes_to_the_optimal_assignment(seed, device):
    """With hard marginals, eps well below the optimality gap decodes to the exact optimum."""
    rng = np.random.default_rng(seed)
    n = 6
    C = rng.uniform(0, 1, (n, n))
    gap = _optimality_gap(C)
    eps = gap / (4 * math.log(math.factorial(n)))
    # Near-degenerate instances converge slowly at such eps (for POT too); decoding needs only a
    # small marginal error, not convergence to the last digit.
    m = uotmatch.match(_t(device, C), eps, tol=1e-6, max_iter=3000)
    assert float(m.marginal_error) < 1e-3
    r, c = linear_sum_assignment(C)
    assert m.gt_index().tolist() == c[np.argsort(r)].tolist()


def test_figure1_limits_give_the_papers_matches():
    """Figure 1 (c), (d), (e) of the UOT paper: the matches named in its text."""
    expected = {
        "c": [(1, "A"), (4, "A"), (5, "B")],  # "both predictions 1 and 4 are matched towards A"
        "d": [(4, "A"), (5, "B")],  # one-to-one
        "e": [(4, "A"), (4, "B")],  # "both A and B are matched to prediction 4"
    }
    for panel, pairs in expected.items():
        _, eps, tau1, tau2 = figure1.REGIMES[panel]
        m = uotmatch.match(figure1.COST, eps, tau1, tau2, background_cost=figure1.BACKGROUND_COST)
        assert figure1.hard_matches(m.plan) == pairs, panel


def test_figure1_soft_regimes_approach_their_limits():
    """(f) ~ (c), (g) ~ (d), (h) ~ (e): the eps = 0.05 plans keep the limit's hard matches."""
    for soft, hard in [("f", "c"), ("g", "d"), ("h", "e")]:
        plans = {}
        for panel in (soft, hard):
            _, eps, tau1, tau2 = figure1.REGIMES[panel]
            plans[panel] = uotmatch.match(
                figure1.COST, eps, tau1, tau2, background_cost=figure1.BACKGROUND_COST
            ).plan
        assert figure1.hard_matches(plans[soft]) == figure1.hard_matches(plans[hard])


def test_figure1_demo_prints_every_regime(capsys):
    figure1.main([])
    out = capsys.readouterr().out
    for panel in "cdefgh":
        assert f"({panel})" in out
    assert "hard matches: 1->A, 4->A, 5->B" in out
    assert "``" not in out and "background cost 0.8" in out  # plain text, no RST markup

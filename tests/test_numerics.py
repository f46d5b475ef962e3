"""Stability: tiny eps, huge costs, forbidden pairs, empty dimensions."""

import math

import numpy as np
import pytest
import torch

import uotmatch

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
        agree = (m.assignment().cpu() == exact.assignment()).float().mean()
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
    assert m.assignment().shape == (2, M)
    assert all(len(pred) == 0 and len(gt) == 0 for pred, gt in m.pairs())  # nothing to match
    if N == 0:
        # only the background: every prediction goes there, with the hard marginals too
        m = uotmatch.match(C, 0.1, background_cost=0.5)
        torch.testing.assert_close(m.plan, torch.ones(2, M, 1))
        assert (m.assignment() == -1).all()
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
        exact.assignment().tolist()
        == np.where(C.min(1).values.numpy() < 0.3, C.argmin(1).numpy(), -1).tolist()
    )


@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize("taus", [(1.0, 1.0), (100.0, 1.0), (INF, INF), (INF, 0.5), (0.0, 1.0)])
def test_reported_error_is_the_returned_plans_error(scale, taus):
    """The error the solver reports is that of the plan it returns (recomputed independently),
    and float32 agrees with float64. Regression: translation steps once went through the
    per-step clamp and silently changed the plan after the last check."""
    from uotmatch._sinkhorn import plan_error

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


@pytest.mark.parametrize("tau2", [INF, 0.0])  # (with 0 < tau2 < inf translation steps run
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # and compaction is off)
def test_single_entry_columns_compaction_equals_dense(tau2, dtype, monkeypatch):
    """OTA-like kernels (penalties, forbidden pairs, padding): solving the single-entry lines in
    closed form gives the dense iteration's plan."""
    import uotmatch._sinkhorn as S

    g = torch.Generator().manual_seed(5)
    B, M, N = 3, 400, 6
    C = torch.rand(B, M, N, generator=g, dtype=dtype) * 3
    C = C + 1e5 * (torch.rand(B, M, N, generator=g) < 0.9)  # most pairs far out of reach
    C = C.masked_fill(torch.rand(B, M, N, generator=g) < 0.05, INF)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 2] = False
    bg = torch.rand(B, M, generator=g, dtype=dtype)
    b = torch.full((N,), 5.0, dtype=dtype)
    kw = dict(b=b, mask=mask, background_cost=bg, tol=1e-7 if dtype == torch.float64 else 1e-5)
    monkeypatch.setattr(S, "COMPACT_MIN_SIZE", 0)  # a small batch stands for a large one
    built = []
    build = S._Compaction.build
    monkeypatch.setattr(
        S._Compaction, "build", staticmethod(lambda *a: built.append(build(*a)) or built[-1])
    )
    compact = uotmatch.match(C, 0.05, INF, tau2, **kw)
    assert built and built[0] is not None and built[0].idx.shape[1] < M // 2  # it did compact
    monkeypatch.setattr(S, "COMPACT_MAX_FRACTION", 0.0)
    dense = uotmatch.match(C, 0.05, INF, tau2, **kw)
    assert bool(compact.converged.all()) and bool(dense.converged.all())
    diff = (compact.plan - dense.plan).abs().sum((1, 2)) / M
    assert float(diff.max()) < (1e-6 if dtype == torch.float64 else 1e-4)
    assert torch.equal(compact.assignment(), dense.assignment())

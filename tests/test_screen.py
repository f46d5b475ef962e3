"""Background screening (``uotmatch._screen``): rows that can only go to the background leave a
balanced problem before the kernel is built. The plan must be the dense solve's, row for row."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import uotmatch
from tests.conftest import on
from tests.reference import pot_plan
from uotmatch import _screen
from uotmatch._rows import candidate_rows, gather_rows
from uotmatch._state import plan_error

INF = math.inf


def detection_scene(B, M, N, seed, near=0.1, far=1e5, masses=False, dtype=torch.float64):
    """Costs ``[B, M, N]``, background ``[B, M]``, a ``[B, M]``, b ``[B, N]``: a fraction
    ``near`` of the rows are candidates of some ground truths (costs 0..4; every ground truth
    has at least 8, as OTA's centre prior ensures), the rest cost ``far`` more."""
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(B, M, N, generator=g, dtype=dtype) * 4
    cand = torch.rand(B, M, N, generator=g) < 0.3
    cand &= (torch.rand(B, M, 1, generator=g) < near).expand(B, M, N)
    rows = torch.rand(B, M, N, generator=g).argsort(1)[:, :8]  # [B, 8, N]
    cand.scatter_(1, rows, True)
    cost = torch.where(cand, cost, far + cost)
    bg = torch.rand(B, M, generator=g, dtype=dtype) * 0.5 + 0.5
    a = torch.ones(B, M, dtype=dtype)
    if masses:
        a = torch.rand(B, M, generator=g, dtype=dtype) + 0.5
    b = torch.full((B, N), 3.0, dtype=dtype)
    return cost, bg, a, b


@pytest.fixture
def calls(monkeypatch):
    """What every screening call returned (``None``: it declined)."""
    out, real = [], _screen.screen

    def record(*args, **kwargs):
        out.append(real(*args, **kwargs))
        return out[-1]

    monkeypatch.setattr(_screen, "screen", record)
    return out


class Moved:
    """A Matching's results on the CPU, to compare with a CPU solve."""

    def __init__(self, m):
        self.plan, self.f, self.g = m.plan.cpu(), m.f.cpu(), m.g.cpu()
        self.converged, self._gt_index = m.converged.cpu(), m.gt_index().cpu()

    def gt_index(self):
        return self._gt_index


def solve(cost, bg, a, b, eps, **kw):
    return uotmatch.match(cost, eps, a=a, b=b, background_cost=bg, **kw)


def largest_price(m, b):
    """``max_j (g_j - g_∅)`` over the ground truths with mass, ``[B]``."""
    g = m.g
    price = torch.where(b > 0, g[:, :-1] - g[:, -1:], -INF)
    return price.amax(-1)


@given(
    seed=st.integers(0, 10_000),
    eps=st.sampled_from([0.1, 0.3, 1.0]),
    far=st.sampled_from([2.0, 6.0, 1e5]),
    masses=st.booleans(),
    keep=st.sampled_from([1.0, 0.5]),
)
def test_price_bound_bounds_the_optimal_prices(seed, eps, far, masses, keep):
    cost, bg, a, b = detection_scene(3, 150, 5, seed, near=0.3, far=far, masses=masses)
    m = uotmatch.match(cost, eps, a=a, b=b, background_cost=bg, tol=1e-11, max_iter=50_000)
    assert bool(m.converged.all())
    truth = largest_price(m, b)
    # Any sample of rows gives a valid bound (fewer rows only loosen it).
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(3, 150, generator=g).argsort(-1)[:, : int(150 * keep)]
    D = gather_rows(cost, rows) - gather_rows(bg, rows).unsqueeze(-1)
    bound = _screen.price_bound(D, gather_rows(a, rows), b, eps)
    assert torch.all(truth <= bound + 1e-9), (truth, bound)
    if keep == 1.0:  # all rows can fill every ground truth: a finite bound
        assert torch.isfinite(bound).all()


def test_price_bound_is_infinite_when_the_sample_cannot_fill_a_column():
    D = torch.tensor([[[0.0, INF], [1.0, INF], [INF, 0.5]]], dtype=torch.float64)
    a = torch.ones(1, 3, dtype=torch.float64)
    b = torch.tensor([[1.0, 1.5]], dtype=torch.float64)  # column 1 has only one row: 1 < 1.5
    assert torch.isinf(_screen.price_bound(D, a, b, 0.1)).all()
    b = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # a massless column sets no price
    assert torch.isfinite(_screen.price_bound(D, a, b, 0.1)).all()


@given(
    seed=st.integers(0, 10_000),
    eps=st.sampled_from([0.1, 0.3, 1.0]),
    far=st.sampled_from([3.0, 8.0, 1e5]),
    masses=st.booleans(),
    holes=st.booleans(),
)
def test_screened_solve_equals_the_dense_solve(seed, eps, far, masses, holes, device):
    B, M, N = 3, 400, 6
    cost, bg, a, b = detection_scene(B, M, N, seed, far=far, masses=masses)
    g = torch.Generator().manual_seed(seed + 1)
    mask = None
    if holes:  # padded ground truths anywhere, a row that cannot use the background, and one
        mask = torch.rand(B, N, generator=g) < 0.7  # that can use nothing else
        mask[:, 0] = True
        bg[0, 3] = INF
        cost[1, 5] = INF
        a[2, 7] = 0.0
    kw = dict(gt_mask=mask, tol=1e-11, max_iter=20_000)
    dense = solve(cost, bg, a, b, eps, screen=False, **kw)
    c, g_, a_, b_, m_ = on(device, (cost, bg, a, b, mask))
    screened = solve(c, g_, a_, b_, eps, screen=True, **{**kw, "gt_mask": m_})
    assert screened.plan.device.type == device.type
    screened = Moved(screened)
    if far == 1e5:  # penalty rows are certain background (with far = 3 or 8, per eps)
        found = _screen.screen(
            cost, cost.amin(-1), bg, a, torch.where(mask, b, 0) if mask is not None else b, eps
        )
        assert found is not None and found.idx.shape[1] < M / 2
    assert bool(dense.converged.all()) and bool(screened.converged.all())
    torch.testing.assert_close(screened.plan, dense.plan, atol=1e-8, rtol=0)

    cols = torch.ones(B, N + 1, dtype=torch.bool)
    if mask is not None:
        cols[:, :N] = mask

    def gauge(m):  # up to the balanced problem's shift f + t, g - t; 0 on massless lines
        return torch.where(a > 0, m.f + m.g[:, -1:], 0), torch.where(cols, m.g - m.g[:, -1:], 0)

    torch.testing.assert_close(gauge(screened), gauge(dense), atol=1e-6, rtol=0)
    assert torch.equal(screened.gt_index(), dense.gt_index())


def test_screened_plan_matches_pot(calls):
    cost, bg, a, b = detection_scene(2, 300, 4, seed=3, far=10.0)
    m = solve(cost, bg, a, b, 0.1, tol=1e-12, max_iter=20_000, screen=True)
    assert calls[-1] is not None
    for i in range(2):
        ref = pot_plan(cost[i].numpy(), a[i].numpy(), b[i].numpy(), 0.1, INF, INF, bg[i].numpy())
        np.testing.assert_allclose(m.plan[i].numpy(), ref, atol=1e-9, rtol=0)


def test_excluded_rows_go_to_the_background_and_satisfy_the_fixed_point(calls):
    cost, bg, a, b = detection_scene(2, 500, 5, seed=7, masses=True)
    eps = 0.1
    m = solve(cost, bg, a, b, eps, tol=1e-12, max_iter=20_000, screen=True)
    screen = calls[-1]
    kept = torch.zeros(2, 500, dtype=torch.bool)
    kept[
        torch.arange(2).unsqueeze(1).expand_as(screen.idx)[screen.valid], screen.idx[screen.valid]
    ] = True
    excluded = m.plan[~kept]
    assert len(excluded) > 800
    assert torch.equal(excluded[:, :-1], torch.zeros_like(excluded[:, :-1]))
    assert torch.equal(excluded[:, -1], a[~kept])
    # Every row's potential solves its own update: f_i = eps log a_i - eps LSE_j (g_j - C_ij)/eps.
    full = torch.cat([cost, bg.unsqueeze(-1)], -1)
    f = eps * a.log() - eps * torch.logsumexp((m.g.unsqueeze(1) - full) / eps, -1)
    torch.testing.assert_close(m.f, f, atol=1e-9, rtol=0)


def test_reported_error_is_the_full_plans_error(calls):
    cost, bg, a, b = detection_scene(4, 2000, 8, seed=11, dtype=torch.float32)
    m = uotmatch.match(cost, 0.1, b=b, background_cost=bg, tol=1e-3)  # screened by default
    assert calls[-1] is not None and calls[-1].idx.shape[1] < 400
    b_full = torch.cat([b, (a.sum(-1) - b.sum(-1)).unsqueeze(-1)], -1)
    err = plan_error(
        m.plan.double(), m.f.double(), m.g.double(), a.double(), b_full.double(), INF, INF
    )
    torch.testing.assert_close(m.marginal_error.double(), err, rtol=1e-4, atol=1e-7)
    assert float(m.marginal_error.max()) <= 1e-3


def test_screening_declines_without_background_mass_or_with_gradients(calls):
    cost, bg, a, b = detection_scene(1, 2000, 4, seed=5)
    b = torch.full((1, 4), 500.0, dtype=torch.float64)  # sum b = sum a: nothing for ∅
    m = solve(cost, bg, a, b, 0.5, tol=1e-9, max_iter=20_000, screen=True)
    assert calls == [None] and bool(m.converged.all())
    cost = cost.clone().requires_grad_()
    b = torch.full((1, 4), 3.0, dtype=torch.float64)
    m = solve(cost, bg, a, b, 0.5, tol=1e-6)  # 2000 rows: screened if it were not for grad
    assert calls == [None]  # the differentiable solve is the dense one
    m.plan[..., 0].sum().backward()
    assert cost.grad is not None
    with pytest.raises(ValueError, match="screen=True cannot apply: gradients are needed"):
        solve(cost, bg, a, b, 0.5, screen=True)


def test_infeasible_column_still_raises_on_screened_sizes():
    cost, bg, a, b = detection_scene(1, 300, 4, seed=2)
    cost[0, :, 2] = INF  # a ground truth with mass that no prediction may take
    with pytest.raises(ValueError, match="column 2 has mass but no finite-cost"):
        solve(cost, bg, a, b, 0.1, screen=True)


def test_screen_true_is_refused_where_it_cannot_apply():
    cost, bg, a, b = detection_scene(1, 50, 4, seed=2)
    with pytest.raises(ValueError, match="screen=True cannot apply: it needs tau1 = tau2 = inf"):
        uotmatch.match(cost, 0.1, 1.0, INF, background_cost=bg, screen=True)
    with pytest.raises(ValueError, match="screen=True cannot apply: it needs a background"):
        uotmatch.match(cost, 0.1, b=torch.full((4,), 12.5), screen=True)
    with pytest.raises(ValueError, match="screen=True cannot apply: eps = 0"):
        uotmatch.match(cost, 0.0, background_cost=bg, screen=True)
    with pytest.raises(ValueError, match="screen must be True or False"):
        uotmatch.match(cost, 0.1, background_cost=bg, screen="yes")


def test_screening_on_cuda_equals_cpu(calls):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cost, bg, a, b = detection_scene(3, 3000, 10, seed=1, dtype=torch.float32)
    cpu = uotmatch.match(cost, 0.1, b=b, background_cost=bg, tol=1e-5)
    gpu = uotmatch.match(cost.cuda(), 0.1, b=b.cuda(), background_cost=bg.cuda(), tol=1e-5)
    assert None not in calls
    torch.testing.assert_close(gpu.plan.cpu(), cpu.plan, atol=1e-4, rtol=0)


@pytest.mark.parametrize("calloc_bytes", [0, 2**60])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_background_plan_rows(calloc_bytes, dtype, monkeypatch):
    monkeypatch.setattr(_screen, "CALLOC_BYTES", calloc_bytes)
    a = torch.tensor([[1.0, 0.0, 2.5]], dtype=dtype)
    z = _screen.background_plan(a, 4)
    expected = torch.tensor([[[0, 0, 0, 1.0], [0, 0, 0, 0], [0, 0, 0, 2.5]]], dtype=dtype)
    assert z.dtype == dtype and torch.equal(z, expected)
    z[0, 1, 1] = 7.0  # an ordinary writable tensor
    assert float(z.sum()) == 10.5


def test_large_plans_come_zeroed_from_calloc(monkeypatch, calls):
    monkeypatch.setattr(_screen, "CALLOC_BYTES", 0)
    cost, bg, a, b = detection_scene(2, 300, 4, seed=4)
    m = solve(cost, bg, a, b, 0.1, tol=1e-10, max_iter=20_000, screen=True)
    monkeypatch.setattr(_screen, "CALLOC_BYTES", 2**60)
    ref = solve(cost, bg, a, b, 0.1, tol=1e-10, max_iter=20_000, screen=True)
    assert calls[-1] is not None and torch.equal(m.plan, ref.plan)


def test_rows_that_allow_nothing_and_carry_nothing_are_left_out_of_the_sample(calls):
    """A massless row forbidden everywhere (background included) has no d_min; the sample of
    its item is then shorter than the others' and padded, and the padding must not count."""
    cost, bg, a, b = detection_scene(2, 300, 4, seed=9, far=1e5)
    cost[0, :40] = INF
    bg[0, :40] = INF
    a[0, :40] = 0.0
    idx, valid = candidate_rows(torch.isfinite(cost.amin(-1) - bg))
    assert idx.shape[1] == 300 and int(valid[0].sum()) == 260 and bool(valid[1].all())
    dense = solve(cost, bg, a, b, 0.1, tol=1e-10, max_iter=20_000, screen=False)
    screened = solve(cost, bg, a, b, 0.1, tol=1e-10, max_iter=20_000, screen=True)
    assert calls[-1] is not None
    torch.testing.assert_close(screened.plan, dense.plan, atol=1e-8, rtol=0)
    assert not screened.plan[0, :40].any()

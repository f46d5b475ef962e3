"""match() against POT, batching and padding, potentials, containers, gradients."""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import uotmatch
from tests.reference import pot_plan, uot_objective, with_background

INF = math.inf
TAUS = st.sampled_from([0.0, 0.1, 1.0, 10.0, INF])


@st.composite
def problems(draw, batch=False):
    """A random UOT problem: float64 numpy cost, masses, eps, taus and background."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    M, N = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    eps = draw(st.floats(0.05, 1.0))
    tau1, tau2 = draw(TAUS), draw(TAUS)
    C = rng.uniform(0, 1, (M, N))
    a = rng.uniform(0.2, 2.0, M) if draw(st.booleans()) else np.ones(M)
    b = rng.uniform(0.2, 2.0, N) if draw(st.booleans()) else np.ones(N)
    bg = draw(st.sampled_from([None, "scalar", "rows"]))
    background = {None: None, "scalar": float(rng.uniform(0, 1.5)), "rows": rng.uniform(0, 1.5, M)}[
        bg
    ]
    if math.isinf(tau1) and math.isinf(tau2):
        # Make the balanced problem feasible: equal mass, or less ground-truth mass + background.
        if background is None:
            b = b * a.sum() / b.sum()
        elif b.sum() > a.sum():
            b = b * a.sum() / b.sum() * rng.uniform(0.3, 1.0)
    return C, a, b, eps, tau1, tau2, background


@given(problems())
def test_plan_equals_pot(problem):
    C, a, b, eps, tau1, tau2, bg = problem
    expected = pot_plan(C, a, b, eps, tau1, tau2, bg)
    bg_arg = None if bg is None else (torch.tensor(bg) if isinstance(bg, np.ndarray) else bg)
    m = uotmatch.match(
        torch.tensor(C),
        eps,
        tau1,
        tau2,
        a=torch.tensor(a),
        b=torch.tensor(b),
        background_cost=bg_arg,
        tol=1e-11,
        max_iter=100_000,
    )
    assert bool(m.converged), m.marginal_error
    np.testing.assert_allclose(m.plan.numpy(), expected, atol=1e-8 * max(a.sum(), 1))


@given(problems())
def test_plan_minimises_the_stated_objective(problem):
    """Perturbing the returned plan never lowers the objective of the issue (finite taus)."""
    C, a, b, eps, tau1, tau2, bg = problem
    assume(math.isfinite(tau1) and math.isfinite(tau2))  # hard constraints: the POT comparison
    m = uotmatch.match(C, eps, tau1, tau2, a=a, b=b, background_cost=bg, tol=1e-12, max_iter=10**5)
    Cf, bf = (C, b) if bg is None else with_background(C, a, b, bg)
    best = uot_objective(m.plan, Cf, a, bf, eps, tau1, tau2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        Q = m.plan * np.exp(rng.normal(0, 1e-3, m.plan.shape))
        assert uot_objective(Q, Cf, a, bf, eps, tau1, tau2) >= best - 1e-12


@given(problems(), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_padded_batch_equals_per_item(problem, extra, seed):
    """Columns masked out anywhere (holes, not only a suffix) are invisible to each item."""
    C, a, b, eps, tau1, tau2, bg = problem
    rng = np.random.default_rng(seed)
    M, N = C.shape
    items = []
    for i in range(3):  # item 0 is the problem; the others are variants with fewer columns
        keep = np.ones(N, bool) if i == 0 else rng.random(N) < 0.7
        if not keep.any():
            keep[rng.integers(N)] = True
        items.append(keep)
    width = N + extra
    Cb = rng.uniform(-5, 5, (3, M, width))  # garbage in the padding
    bb = rng.uniform(0.1, 3, (3, width))
    mask = np.zeros((3, width), bool)
    for i, keep in enumerate(items):
        slots = np.sort(rng.choice(width, keep.sum(), replace=False))
        mask[i, slots] = True
        Cb[i][:, slots] = C[:, keep]
        bb[i, slots] = b[keep]
    # sub-items would be unbalanced without a background: covered by the draws with one
    assume(not (math.isinf(tau1) and math.isinf(tau2) and bg is None))
    kw = dict(tol=1e-11, max_iter=100_000)
    bgb = None if bg is None else (np.broadcast_to(bg, (3, M)).copy() if np.ndim(bg) else bg)
    batched = uotmatch.match(
        torch.tensor(Cb),
        eps,
        tau1,
        tau2,
        a=torch.tensor(a),
        b=torch.tensor(bb),
        gt_mask=torch.tensor(mask),
        background_cost=None if bgb is None else torch.tensor(bgb) if np.ndim(bgb) else bgb,
        **kw,
    )
    for i in range(3):
        cols = np.flatnonzero(mask[i])
        if math.isinf(tau1) and math.isinf(tau2) and bb[i, cols].sum() > a.sum():
            continue
        alone = uotmatch.match(
            torch.tensor(Cb[i][:, cols]),
            eps,
            tau1,
            tau2,
            a=torch.tensor(a),
            b=torch.tensor(bb[i, cols]),
            background_cost=None if bg is None else (torch.tensor(bg) if np.ndim(bg) else bg),
            **kw,
        )
        plan = batched.plan[i].numpy()
        assert np.all(plan[:, np.flatnonzero(~mask[i])] == 0), "masked columns must be exactly 0"
        real = np.r_[cols, width] if bg is not None else cols
        np.testing.assert_allclose(plan[:, real], alone.plan.numpy(), atol=1e-9)


@pytest.mark.parametrize("tau1,tau2", [(INF, INF), (1.0, INF), (INF, 0.5), (2.0, 0.3), (0.0, 1.0)])
def test_potentials_satisfy_fixed_point(tau1, tau2, device):
    """f = lam1 eps (log a - LSE_j((g_j - C_ij)/eps)), likewise g, and P = exp((f+g-C)/eps)."""
    g_ = torch.Generator().manual_seed(3)
    C = torch.rand(2, 7, 4, generator=g_, dtype=torch.float64)
    a = torch.rand(2, 7, generator=g_, dtype=torch.float64) + 0.5
    b = torch.rand(2, 4, generator=g_, dtype=torch.float64) + 0.5
    eps = 0.1
    m = uotmatch.match(
        C.to(device), eps, tau1, tau2, a=a.to(device), background_cost=0.6, tol=1e-12
    )
    f, g, P = m.f.cpu(), m.g.cpu(), m.plan.cpu()
    Cf = torch.cat([C, torch.full((2, 7, 1), 0.6, dtype=torch.float64)], -1)
    bf = torch.cat(
        [torch.ones(2, 4, dtype=torch.float64), (a.sum(-1) - 4).clamp_min(0)[:, None]], -1
    )
    del b

    def lam(t):
        return 1.0 if math.isinf(t) else t / (t + eps)

    f_fix = lam(tau1) * eps * (a.log() - torch.logsumexp((g[:, None, :] - Cf) / eps, -1))
    g_fix = lam(tau2) * eps * (bf.log() - torch.logsumexp((f[:, :, None] - Cf) / eps, -2))
    torch.testing.assert_close(
        P, ((f[:, :, None] + g[:, None, :] - Cf) / eps).exp(), atol=1e-12, rtol=1e-9
    )
    if math.isinf(tau1) and math.isinf(tau2):
        # balanced potentials are defined up to f + t, g - t: compare the plan they induce
        f_fix = f_fix - (f_fix - f).mean(-1, keepdim=True)
    torch.testing.assert_close(f, f_fix, atol=1e-8, rtol=0)
    torch.testing.assert_close(g, g_fix, atol=1e-8, rtol=0)


def test_batched_shapes_and_fields():
    C = torch.rand(3, 5, 2)
    m = uotmatch.match(C, 0.1, background_cost=1.0)
    assert m.plan.shape == (3, 5, 3) and m.has_background
    assert m.f.shape == (3, 5) and m.g.shape == (3, 3)
    assert m.converged.shape == (3,) and m.converged.dtype == torch.bool
    assert m.marginal_error.shape == (3,) and m.iterations.dtype == torch.int64
    assert m.gt_index().shape == (3, 5)
    pairs = m.pairs()
    assert len(pairs) == 3 and all(
        p.dtype == torch.int64 and q.dtype == torch.int64 for p, q in pairs
    )
    assert "Matching(plan shape=(3, 5, 3)" in repr(m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_dtype_and_device_round_trip(dtype, device):
    C = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.5, 0.6]], dtype=dtype, device=device)
    m = uotmatch.match(C, 0.05, background_cost=0.4)
    assert m.plan.dtype == dtype and m.plan.device == C.device
    assert m.gt_index().tolist() == [0, 1, -1]
    assert bool(m.converged)


def test_numpy_and_list_round_trip():
    C = np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.6]], dtype=np.float32)
    m = uotmatch.match(C, 0.05, background_cost=0.4)
    assert isinstance(m.plan, np.ndarray) and m.plan.dtype == np.float32
    assert isinstance(m.f, np.ndarray) and m.gt_index().tolist() == [0, 1, -1]
    pred, gt = m.pairs()
    assert pred.tolist() == [0, 1] and gt.tolist() == [0, 1]
    lst = uotmatch.match(C.tolist(), 0.05, background_cost=0.4)
    assert isinstance(lst.plan, list) and isinstance(lst.plan[0], list)
    np.testing.assert_allclose(np.array(lst.plan), m.plan, atol=1e-6)
    assert lst.gt_index() == [0, 1, -1]


def test_gradcheck_float64(device):
    g_ = torch.Generator().manual_seed(0)
    for tau1, tau2, bg in [(INF, INF, 0.5), (1.0, 0.5, None), (INF, 2.0, None)]:
        C = torch.rand(4, 3, generator=g_, dtype=torch.float64).to(device).requires_grad_()

        def plan(c, tau1=tau1, tau2=tau2, bg=bg):
            return uotmatch.match(
                c, 0.2, tau1, tau2, background_cost=bg, tol=1e-14, max_iter=5000
            ).plan

        assert torch.autograd.gradcheck(plan, (C,))


def test_gradcheck_through_the_background_cost_alone(device):
    """The documented gradient inputs include ``background_cost``: a cost without grad and a
    background cost with it still give a differentiable plan."""
    g_ = torch.Generator().manual_seed(1)
    C = torch.rand(5, 3, generator=g_, dtype=torch.float64).to(device)
    bg = (torch.rand(5, generator=g_, dtype=torch.float64) * 0.5 + 0.2).to(device)
    bg.requires_grad_()

    def plan(bg):
        return uotmatch.match(C, 0.2, background_cost=bg, tol=1e-14, max_iter=5000).plan

    assert plan(bg).requires_grad
    assert torch.autograd.gradcheck(plan, (bg,))


def test_no_graph_without_requires_grad():
    m = uotmatch.match(torch.rand(4, 3), 0.1, background_cost=0.5)
    assert not m.plan.requires_grad and m.plan.grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_solves_return_ordinary_tensors(dtype):
    """Small problems are solved in inference mode; what comes back must not be inference tensors.

    They enter autograd as constants (the plan-weighted loss) and in-place operations."""
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(2, 6, 3, generator=g, dtype=dtype)
    m = uotmatch.match(cost, 0.1, background_cost=0.5)
    for t in (m.plan, m.f, m.g, m.marginal_error, m.iterations, m.converged):
        assert not t.is_inference()
    pred = torch.rand(2, 6, 4, dtype=dtype, requires_grad=True)
    (m.plan * pred).sum().backward()  # the plan saved for backward
    assert torch.equal(pred.grad, m.plan)
    plan = m.plan.clone()
    m.plan.mul_(2)
    assert torch.equal(m.plan, 2 * plan)

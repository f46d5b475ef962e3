"""Every bad input of match() raises a ValueError that names the argument."""

import math

import numpy as np
import pytest
import torch

import uotmatch

INF = math.inf
C = torch.rand(4, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cost=torch.rand(5)), r"cost must be \[M, N\] or \[B, M, N\], got shape \(5,\)"),
        (dict(cost=torch.rand(1, 2, 3, 4)), r"cost must be .* got shape \(1, 2, 3, 4\)"),
        (dict(cost=torch.ones(3, 2, dtype=torch.int64)), "cost must have a floating dtype"),
        (dict(cost="abc"), "cost must be a torch tensor, numpy array or nested list"),
        (dict(cost=[[1.0, 2.0], [3.0]]), "cost must be a rectangular nested list"),
        (dict(cost=torch.tensor([[0.0, float("nan")]])), "cost must not contain NaN"),
        (dict(cost=torch.tensor([[0.0, -INF]])), "cost must not contain -inf"),
        (dict(eps=-0.1), "eps must be >= 0, got -0.1"),
        (dict(eps=float("nan")), "eps must not be NaN"),
        (dict(eps=INF), "eps must be finite"),
        (dict(eps="0.1"), "eps must be a real number"),
        (dict(tau1=-1.0), "tau1 must be >= 0"),
        (dict(tau2=float("nan")), "tau2 must not be NaN"),
        (dict(tau2=-INF), r"tau2 must be in \[0, inf\]"),
        (dict(a=torch.ones(5)), r"a must be \[4\] \(one mass per prediction\), got shape \(5,\)"),
        (dict(a=-torch.ones(4), tau1=1.0, tau2=1.0), "a must be finite and >= 0"),
        (dict(b=torch.ones(2)), r"b must be \[3\] \(one mass per ground truth\)"),
        (dict(b=torch.tensor([1.0, float("nan"), 1.0]), tau2=1.0), "b must be finite and >= 0"),
        (dict(gt_mask=torch.ones(3)), "mask must be a bool tensor/array"),
        (dict(gt_mask=torch.ones(4, dtype=torch.bool)), r"mask must be \[3\]"),
        (dict(background_cost=torch.ones(3)), r"background_cost must be \[4\]"),
        (dict(background_cost=float("nan")), "background_cost must not contain NaN"),
        (dict(max_iter=0), "max_iter must be an integer >= 1"),
        (dict(max_iter=2.5), "max_iter must be an integer >= 1"),
        (dict(tol=0.0), "tol must be > 0"),
        (dict(tol=-1.0), "tol must be > 0"),
    ],
)
def test_bad_input(kwargs, message):
    args = dict(cost=C, eps=0.1, tau1=1.0, tau2=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        uotmatch.match(args.pop("cost"), args.pop("eps"), **args)


def test_batched_shapes_must_agree():
    with pytest.raises(ValueError, match=r"a must be \[4\] or \[2, 4\]"):
        uotmatch.match(torch.rand(2, 4, 3), 0.1, 1.0, 1.0, a=torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"mask must be \[3\] or \[2, 3\]"):
        mask = torch.ones(1, 3, dtype=torch.bool)
        uotmatch.match(torch.rand(2, 4, 3), 0.1, 1.0, 1.0, gt_mask=mask)
    with pytest.raises(ValueError, match=r"a must be \[4\] \("):  # unbatched cost, batched mass
        uotmatch.match(torch.rand(4, 3), 0.1, 1.0, 1.0, a=torch.ones(2, 4))


def test_unequal_masses_with_hard_marginals_are_infeasible():
    with pytest.raises(ValueError, match=r"sum\(a\) = 4 and sum\(b\) = 3: infeasible.*background"):
        uotmatch.match(C, 0.1)
    with pytest.raises(ValueError, match="infeasible"):
        uotmatch.match(torch.rand(2, 5), 0.1, background_cost=0.5)  # N > M: background mass 0
    uotmatch.match(C, 0.1, background_cost=0.5)  # fine with a background
    uotmatch.match(C, 0.1, 1.0, INF)  # and with a finite tau


def test_eps_zero_needs_a_limit():
    with pytest.raises(ValueError, match=r"eps = 0 is defined only for the limits.*\(1.0, inf\)"):
        uotmatch.match(C, 0.0, 1.0, INF)
    with pytest.raises(ValueError, match=r"eps = 0 .*\(0.0, 0.0\)"):
        uotmatch.match(C, 0.0, 0.0, 0.0)


def test_forbidden_rows_under_a_hard_marginal():
    cost = torch.tensor([[INF, INF], [0.1, 0.2]])
    with pytest.raises(ValueError, match="prediction 0 has mass but no finite-cost column"):
        uotmatch.match(cost, 0.1, INF, 1.0)
    m = uotmatch.match(cost, 0.1, 1.0, 1.0)  # a finite tau1 lets that row stay empty
    assert torch.all(m.plan[0] == 0)


def test_numpy_mask_and_lists_accepted():
    m = uotmatch.match(
        np.random.rand(4, 3),
        0.1,
        1.0,
        1.0,
        gt_mask=np.array([True, False, True]),
        a=[1.0, 1.0, 2.0, 1.0],
        background_cost=[0.5] * 4,
    )
    assert np.all(m.plan[:, 1] == 0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(eps=0.1), dict(eps=0.1, background_cost=0.5), dict(eps=0.1, tau1=1.0, tau2=1.0)],
)
def test_an_empty_batch_gives_an_empty_answer(kwargs):
    """B = 0 (a batch with no images) is an empty Matching, as eps = 0 and the assigners give."""
    m = uotmatch.match(torch.rand(0, 5, 3), **kwargs)
    N = 3 + int("background_cost" in kwargs)
    assert m.plan.shape == (0, 5, N) and m.converged.shape == (0,) and m.status == []
    assert m.pairs() == [] and m.gt_index().shape == (0, 5)


def test_empty_batches_in_the_matchers():
    from uotmatch.detection import HungarianMatcher, UOTMatcher

    outputs = {"pred_logits": torch.zeros(0, 4, 3), "pred_boxes": torch.rand(0, 4, 4)}
    for matcher in (UOTMatcher(), HungarianMatcher(), UOTMatcher(tau1=1.0, tau2=1.0)):
        assert matcher(outputs, []) == []


def test_zero_d_tensors_are_scalars():
    """eps, the taus and background_cost as 0-d tensors (or numpy scalars): the same answer as
    the Python numbers; a one-element 1-d eps is still refused."""
    cost = torch.rand(8, 5, 3)
    want = uotmatch.match(cost, 0.1, 2.0, 1.0, background_cost=0.5).plan
    got = uotmatch.match(
        cost,
        torch.tensor(0.1),
        np.float64(2.0),
        torch.tensor(1.0),
        background_cost=torch.tensor(0.5),
    ).plan
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="eps must be a real number"):
        uotmatch.match(cost, torch.tensor([0.1]))


def test_an_infinite_background_is_named():
    with pytest.raises(ValueError, match="background_cost: item 0's background column has mass"):
        uotmatch.match(torch.rand(8, 5, 3), 0.1, background_cost=math.inf)


def test_unresolved_eps_is_explained_even_when_the_marginals_are_met():
    cost = torch.rand(4, 5, 3)
    with pytest.warns(RuntimeWarning, match="meet the marginals to tol but are not called conv"):
        m = uotmatch.match(cost, 1e-13, background_cost=0.5)
    assert m.status == ["precision"] * 4 and not m.converged.any()
    assert float(m.marginal_error.max()) <= 1e-5  # met, and said so


def test_zero_padded_boxes_need_a_mask():
    """Without gt_mask an all-zero box (padding) would be a class-0 ground truth: refused."""
    from tests.detection.scenes import as_inputs, scene
    from uotmatch.detection import OTAAssigner

    inputs = as_inputs(*scene(0, B=2, G=3))
    inputs["gt_boxes"][1, 2] = 0.0
    del inputs["gt_mask"]
    with pytest.raises(ValueError, match=r"image 1, ground truth 2 is all zeros \(padding\?\)"):
        OTAAssigner()(**inputs)


def test_one_solver_options_value_for_match_the_assigners_and_the_matchers():
    from uotmatch import SolverOptions
    from uotmatch.detection import OTAAssigner, UOTAssigner, UOTMatcher

    cost = torch.rand(2, 6, 3, generator=torch.Generator().manual_seed(0))
    opts = SolverOptions(max_iter=7, tol=1e-3)
    by_value = uotmatch.match(cost, 0.05, background_cost=0.5, solver=opts)
    by_keywords = uotmatch.match(cost, 0.05, background_cost=0.5, max_iter=7, tol=1e-3)
    assert torch.equal(by_value.plan, by_keywords.plan)
    assert int(by_value.iterations.max()) <= 7
    for cls in (OTAAssigner, UOTAssigner, UOTMatcher):
        # the matcher's own default method (sweeps) stays under the keywords
        method = "sweeps" if cls is UOTMatcher else "auto"
        assert cls(solver=opts).solver is opts
        assert cls(max_iter=7, tol=1e-3).solver == SolverOptions(7, 1e-3, method=method)
        assert (cls(solver=opts).max_iter, cls(solver=opts).tol) == (7, 1e-3)
        with pytest.raises(ValueError, match="max_iter and solver were both given"):
            cls(max_iter=5, solver=opts)
        with pytest.raises(ValueError, match="max_iter must be an integer >= 1, got 0"):
            cls(max_iter=0)
    assert OTAAssigner().tol == 1e-4 and UOTMatcher().tol == 1e-3  # each role its own default
    with pytest.raises(ValueError, match="tol and solver were both given"):
        uotmatch.match(cost, 0.05, tol=1e-3, solver=opts)
    with pytest.raises(ValueError, match="solver must be a uotmatch.SolverOptions, got dict"):
        uotmatch.match(cost, 0.05, solver={"tol": 1e-3})
    with pytest.raises(ValueError, match="tol must be > 0, got 0"):
        SolverOptions(tol=0)
    with pytest.raises(ValueError, match="screen must be True or False"):
        SolverOptions(screen="yes")
    with pytest.raises(
        ValueError, match=r"method must be one of \['auto', 'sweeps'\], got 'newton'"
    ):
        SolverOptions(method="newton")


def test_eps_zero_rule_is_stated_once():
    from uotmatch.detection import UOTMatcher

    msg = r"eps = 0 is defined only for the limits \(tau1, tau2\) = \(inf, 0\), \(0, inf\)"
    with pytest.raises(ValueError, match=msg):
        uotmatch.match(torch.rand(3, 2), 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=msg):
        UOTMatcher(eps=0.0, tau1=1.0, tau2=1.0)

"""The GPU path: CUDA results equal the CPU's to the dtype's precision, on the device and in the
dtype asked for; the scaling loop syncs with the host only at its convergence checks."""

from __future__ import annotations

import math

import pytest
import torch

import uotmatch
from tests.detection.scenes import as_inputs, scene
from uotmatch._solver import solve
from uotmatch._state import Marginal
from uotmatch.detection import ASSIGNERS, HungarianMatcher, UOTMatcher, build_assigner

INF = math.inf
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _problem(B=3, M=40, N=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(B, M, N, generator=g, dtype=dtype) * 3
    bg = torch.rand(B, M, generator=g, dtype=dtype)
    return cost, bg


CASES = {
    "balanced + background": dict(tau1=INF, tau2=INF, background=True),
    "unbalanced": dict(tau1=1.0, tau2=0.5, background=False),
    "semi-relaxed": dict(tau1=INF, tau2=0.3, background=True),
    "exact Hungarian": dict(tau1=INF, tau2=INF, background=True, eps=0.0),
    "screened": dict(tau1=INF, tau2=INF, background=True, M=3000, screen=True),
}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_equals_cpu(case, dtype):
    c = CASES[case]
    cost, bg = _problem(M=c.get("M", 40), dtype=dtype)
    if c.get("screen"):  # a detection-like batch: most rows far from every ground truth
        cost[:, 100:] += 1e5
    kw = dict(background_cost=bg if c["background"] else None, tol=1e-6, max_iter=5000)
    if c.get("screen"):
        kw["screen"] = True
    eps = c.get("eps", 0.1)
    cpu = uotmatch.match(cost, eps, c["tau1"], c["tau2"], **kw)
    gkw = {**kw, "background_cost": None if kw["background_cost"] is None else bg.cuda()}
    gpu = uotmatch.match(cost.cuda(), eps, c["tau1"], c["tau2"], **gkw)
    assert gpu.plan.device.type == "cuda" and gpu.plan.dtype == dtype
    assert gpu.converged.device.type == "cuda" and gpu.f.device.type == "cuda"
    atol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(gpu.plan.cpu(), cpu.plan, atol=atol, rtol=0)
    assert gpu.converged.cpu().tolist() == cpu.converged.tolist()


@needs_cuda
def test_cuda_gradients_equal_cpu():
    cost, bg = _problem(B=2, M=8, N=3, dtype=torch.float64)
    grads = []
    for device in ("cpu", "cuda"):
        c = cost.to(device).requires_grad_()
        m = uotmatch.match(c, 0.2, background_cost=bg.to(device), tol=1e-12, max_iter=5000)
        (m.plan[..., :3] * torch.arange(3.0, device=device, dtype=c.dtype)).sum().backward()
        grads.append(c.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-9, rtol=0)


@needs_cuda
@pytest.mark.parametrize("name", list(ASSIGNERS))
def test_cuda_assigners_equal_cpu(name):
    inputs = as_inputs(*scene(3, B=3, G=5))
    cpu = build_assigner(name)(**inputs)
    gpu = build_assigner(name)(**{k: v.cuda() for k, v in inputs.items()})
    assert gpu.gt_index.device.type == "cuda"
    assert torch.equal(gpu.gt_index.cpu(), cpu.gt_index)
    torch.testing.assert_close(gpu.ious.cpu(), cpu.ious, atol=1e-5, rtol=0)


@needs_cuda
@pytest.mark.parametrize("matcher", [HungarianMatcher(), UOTMatcher(eps=0.05)])
def test_cuda_matchers_equal_cpu(matcher):
    g = torch.Generator().manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(4, 20, 6, generator=g),
        "pred_boxes": torch.rand(4, 20, 4),
    }
    targets = [
        {"labels": torch.randint(5, (n,), generator=g), "boxes": torch.rand(n, 4) * 0.5 + 0.2}
        for n in (3, 0, 7, 20)
    ]
    cpu = matcher.solve(outputs, targets)
    gpu = matcher.solve(
        {k: v.cuda() for k, v in outputs.items()},
        [{k: v.cuda() for k, v in t.items()} for t in targets],
    )
    assert gpu.plan.device.type == "cuda"
    torch.testing.assert_close(gpu.plan.cpu(), cpu.plan, atol=1e-4, rtol=0)


class _SyncCounter:
    """Counts the Tensor -> Python conversions (each a host sync on CUDA) while active."""

    NAMES = ("__bool__", "__float__", "__int__", "item", "tolist")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(self_, *args, _original=original, **kwargs):
                self.count += 1
                return _original(self_, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("check_every", [5, 10])
def test_the_loop_syncs_only_at_its_checks(monkeypatch, check_every):
    """With a check every k iterations, the host syncs of a solve grow like iterations / k:
    the same count whatever the iterations between two checks do (CPU-side count of the
    conversions that sync on CUDA). A check syncs once, and once more when some item meets tol
    on its short side (then the long side's error decides, here where plain sweeps reach an
    error of exactly 0 against an unreachable tol): at most two per check."""
    cost, bg = _problem(B=2, M=30, N=5, dtype=torch.float64)
    full = torch.cat([cost, bg.unsqueeze(-1)], -1)  # [B, M, N + 1]
    rows = Marginal(torch.ones(2, 30, dtype=torch.float64), INF)
    cols = Marginal(torch.tensor([[1.0] * 5 + [25.0]] * 2, dtype=torch.float64), INF)
    counts = {}
    for max_iter in (200, 400):
        counter = _SyncCounter(monkeypatch)
        out = solve(
            full, rows, cols, eps=0.01, max_iter=max_iter, tol=1e-300, check_every=check_every
        )
        monkeypatch.undo()
        assert int(out.iterations.max()) == max_iter  # tol unreachable: the whole budget
        counts[max_iter] = counter.count
    per_extra_iteration = (counts[400] - counts[200]) / 200
    assert counts[400] - counts[200] >= 200 // check_every - 1  # it sees every check
    assert per_extra_iteration <= 2.0 / check_every + 1e-9, counts


@needs_cuda
def test_no_sync_between_checks_on_cuda():
    """torch's own sync detector on CUDA: the syncs of a solve are the checks' and a few fixed."""
    cost, bg = _problem(B=2, M=30, N=5)
    full = torch.cat([cost, bg.unsqueeze(-1)], -1).cuda()
    rows = Marginal(torch.ones(2, 30, device="cuda"), INF)
    cols = Marginal(torch.tensor([[1.0] * 5 + [25.0]] * 2, device="cuda"), INF)
    import warnings

    counts = {}
    for max_iter in (200, 400):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                solve(full, rows, cols, eps=0.01, max_iter=max_iter, tol=1e-300, check_every=10)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts[max_iter] = sum("synchroniz" in str(w.message) for w in caught)
    assert (counts[400] - counts[200]) / 200 <= 0.1 + 1e-9, counts

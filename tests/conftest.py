import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "full" (CI, and plain pytest) and "fast" (make test): HYPOTHESIS_PROFILE picks one.
for _name, _examples in (("full", 40), ("fast", 10)):
    settings.register_profile(
        _name,
        max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", _examples)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=True,
    )
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "full"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES, scope="session")
def device(request):
    """Every test that takes ``device`` runs on the CPU and, when available, on CUDA (a
    session-scoped fixture: it holds no state, and hypothesis tests may use it)."""
    return torch.device(request.param)


def on(device, x):
    """Tensors (alone, or in a dict, list or tuple) moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: on(device, v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(on(device, v) for v in x)
    return x

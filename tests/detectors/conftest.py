import pytest

from detectors.data import colorboxes


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A tiny Color Boxes dataset (8 train / 4 val images of 64 px) for training-run tests."""
    root = tmp_path_factory.mktemp("cb")
    colorboxes.generate(root, train=8, val=4, size=64, seed=0, progress=False)
    return root

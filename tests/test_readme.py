"""The README's examples run and print what it says they print."""

import doctest
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples():
    try:
        result = doctest.testfile(
            str(README), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE
        )
    finally:
        torch.set_printoptions(profile="default")
    assert result.attempted >= 5 and result.failed == 0

"""uotmatch: label assignment as entropic unbalanced optimal transport.

One batched solver, :func:`match`, whose three knobs (eps, tau1, tau2) reproduce nearest ground
truth, best prediction, Hungarian one-to-one and balanced OT (OTA) matching as limits, and every
regime in between.
"""

from uotmatch._decode import DECODINGS
from uotmatch._match import match
from uotmatch._options import SolverOptions
from uotmatch._result import Matching

__version__ = "0.2.0"  # the one version source (pyproject.toml reads it)

__all__ = ["DECODINGS", "Matching", "SolverOptions", "match"]

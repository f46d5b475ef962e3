"""The solver's options as one value, validated once, and the eps = 0 rule, stated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from uotmatch import _checks

__all__ = ["MAX_ITER", "TOL", "SolverOptions", "regime"]

#: The iteration budget every entry point defaults to (match, the OT assigners, UOTMatcher).
MAX_ITER = 1000
#: :func:`uotmatch.match`'s (and UOTMatcher's) default tolerance on the relative marginal error.
TOL = 1e-5
#: The ways :class:`SolverOptions` can run the stages (``method``).
METHODS = ("auto", "sweeps")
#: The three (tau1, tau2) that eps = 0 solves exactly.
EXACT_LIMITS = ((math.inf, 0.0), (0.0, math.inf), (math.inf, math.inf))


@dataclass(frozen=True)
class SolverOptions:
    """How :func:`uotmatch.match` iterates, as one value validated when it is made.

    ``match``, the OT assigners (``OTAAssigner``, ``UOTAssigner``) and ``UOTMatcher`` accept as
    ``solver=``. Their ``max_iter=``, ``tol=`` (and ``match``'s ``screen=``) keywords build one;
    giving a keyword and ``solver`` together is a ``ValueError``.

    Attributes:
        max_iter: iterations per item, at most (scaling sweeps and Newton steps, eps-scaling
            stages included), ``>= 1``.
        tol: stop an item once its relative marginal error is at most this, ``> 0``.
        screen: background screening of balanced problems with a background column: None
            where it pays (from a few thousand rows), True always, False never.
        method: how the stages run. ``"auto"``: Newton steps on the dual at every stage of a
            small problem (at most ``2**17`` entries, short side of at most 128 lines, no
            gradients), where a few steps beat the many sweeps a nearly tight supply needs;
            scaling sweeps elsewhere, the items they converge too slowly for finishing by
            Newton steps. ``"sweeps"``: scaling sweeps at every size, Newton steps only for
            those slow items (a small problem keeps Newton's eps schedule): cheaper per
            iteration on small well-conditioned problems (DETR matchings at ``UOTMatcher``'s
            defaults, finite taus), slower where the cost range is hundreds of eps (a small
            eps, costs not normalised).

    Example:
        >>> from uotmatch import SolverOptions
        >>> SolverOptions(tol=1e-4)
        SolverOptions(max_iter=1000, tol=0.0001, screen=None, method='auto')
        >>> SolverOptions(max_iter=0)
        Traceback (most recent call last):
        ...
        ValueError: max_iter must be an integer >= 1, got 0
    """

    max_iter: int = MAX_ITER
    tol: float = TOL
    screen: bool | None = None
    method: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_iter", _checks.integer("max_iter", self.max_iter, low=1))
        object.__setattr__(self, "tol", _checks.real("tol", self.tol, low=0.0, low_open=True))
        object.__setattr__(self, "screen", _checks.boolean("screen", self.screen, allow_none=True))
        object.__setattr__(self, "method", _checks.choice("method", self.method, METHODS))

    @classmethod
    def resolve(
        cls, solver: SolverOptions | None, default: SolverOptions | None = None, **given
    ) -> SolverOptions:
        """``solver``, or one made of the keywords ``given`` on top of ``default``.

        A keyword of None is not given; ``default`` None is this class's defaults. ``solver``
        and a keyword together are refused."""
        named = {k: v for k, v in given.items() if v is not None}
        unknown = set(named) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown solver options {sorted(unknown)}")
        if solver is not None:
            if not isinstance(solver, SolverOptions):
                raise ValueError(
                    f"solver must be a uotmatch.SolverOptions, got {type(solver).__name__}"
                )
            if named:
                raise ValueError(
                    f"{', '.join(sorted(named))} and solver were both given: pass the options "
                    "either as keywords or in solver"
                )
            return solver
        base = default if default is not None else cls()
        return cls(**{**{f.name: getattr(base, f.name) for f in fields(cls)}, **named})


def regime(eps, tau1, tau2) -> tuple[float, float, float]:
    """``(eps, tau1, tau2)`` validated.

    ``eps >= 0``, taus in ``[0, inf]``, and eps = 0 only for the three limits it solves exactly."""
    eps = _checks.real("eps", eps, low=0.0)
    tau1 = _checks.real("tau1", tau1, low=0.0, allow_inf=True)
    tau2 = _checks.real("tau2", tau2, low=0.0, allow_inf=True)
    if eps == 0 and (tau1, tau2) not in EXACT_LIMITS:
        raise ValueError(
            f"eps = 0 is defined only for the limits (tau1, tau2) = (inf, 0), (0, inf) or "
            f"(inf, inf); got ({tau1}, {tau2}). With a finite positive tau the "
            "unregularised problem is a general linear program (not a matching rule): use "
            "eps > 0."
        )
    return eps, tau1, tau2

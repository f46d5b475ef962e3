"""Assigners and matchers by name, with their options checked.

The names are those of the bundled CLIs' ``--assigner`` and ``--matcher``; an option the named one
does not take is an error that lists the ones it does take."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from uotmatch.detection._contracts import DenseAssigner, SetMatcher
from uotmatch.detection._matchers import HungarianMatcher, UOTMatcher
from uotmatch.detection._ota import OTAAssigner, UOTAssigner
from uotmatch.detection._rules import ATSSAssigner, FCOSAssigner, SimOTAAssigner

__all__ = ["ASSIGNERS", "MATCHERS", "build_assigner", "build_matcher", "options_of"]

#: ``--assigner`` name -> class.
ASSIGNERS: dict[str, type[DenseAssigner]] = {
    "fcos": FCOSAssigner,
    "atss": ATSSAssigner,
    "simota": SimOTAAssigner,
    "ota": OTAAssigner,
    "uot": UOTAssigner,
}
#: ``--matcher`` name -> class.
MATCHERS: dict[str, type[SetMatcher]] = {"hungarian": HungarianMatcher, "uot": UOTMatcher}


def options_of(cls: type) -> tuple[str, ...]:
    """The options (constructor keywords) of an assigner or matcher class, in order."""
    params = inspect.signature(cls).parameters.values()  # the constructor's, without self
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds and p.name != "self")


def _build(kind: str, registry: dict, name: str, options: dict):
    if name not in registry:
        raise ValueError(f"{kind} must be one of {list(registry)}, got {name!r}")
    cls = registry[name]
    allowed = options_of(cls)
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise ValueError(
            f"{kind} {name!r} takes no option {unknown[0]!r}; its options are: "
            + ", ".join(allowed)
        )
    return cls(**options)


def build_assigner(name: str, **options) -> DenseAssigner:
    """The dense assigner ``name`` (one of :data:`ASSIGNERS`) with ``options``.

    Example:
        >>> from uotmatch.detection import build_assigner
        >>> build_assigner("uot", eps=0.1, tau1=100.0, tau2=1.0).tau2
        1.0
        >>> build_assigner("ota", tau1=1.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: assigner 'ota' takes no option 'tau1'; its options are: eps, radius, ...
    """
    return _build("assigner", ASSIGNERS, name, options)


def build_matcher(name: str, **options) -> SetMatcher:
    """The set matcher ``name`` (one of :data:`MATCHERS`) with ``options``."""
    return _build("matcher", MATCHERS, name, options)


def matcher_or_build(matcher, options: dict, build: Callable[..., SetMatcher]) -> SetMatcher:
    """``matcher`` itself, or the matcher ``build(matcher, **options)`` makes from a name.

    What the integrations' ``use_matcher`` accept: a :class:`SetMatcher` (then ``options`` must
    be empty: they are for a matcher given by name) or a name (``"uot"``, ``"hungarian"``).
    Anything else is a ``ValueError``."""
    if isinstance(matcher, str):
        matcher = build(matcher, **options)
    elif options:
        raise ValueError(
            f"options ({', '.join(options)}) are for a matcher given by name; got a "
            f"{type(matcher).__name__} instance"
        )
    if not isinstance(matcher, SetMatcher):
        raise ValueError(
            f"matcher must be a uotmatch.detection SetMatcher or 'uot' / 'hungarian', got "
            f"{type(matcher).__name__}"
        )
    return matcher

"""Argument checks shared by :func:`uotmatch.match`, the assigners and the matchers.

Each raises a ``ValueError`` that names the argument, what was expected and what was received."""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, overload

__all__ = ["boolean", "choice", "integer", "real"]


@overload
def real(
    name: str,
    x: Any,
    *,
    low: float | None = ...,
    high: float | None = ...,
    low_open: bool = ...,
    allow_inf: bool = ...,
    allow_none: Literal[False] = ...,
) -> float: ...
@overload
def real(
    name: str,
    x: Any,
    *,
    low: float | None = ...,
    high: float | None = ...,
    low_open: bool = ...,
    allow_inf: bool = ...,
    allow_none: bool,
) -> float | None: ...
def real(
    name: str,
    x: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    allow_inf: bool = False,
    allow_none: bool = False,
) -> float | None:
    """``x`` as a float in ``[low, high]``.

    ``(low, high]`` with ``low_open``; ``+inf`` only with ``allow_inf``, ``None`` only with
    ``allow_none``."""
    if x is None and allow_none:
        return None
    x = _scalar(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {x!r}")
    x = float(x)
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN")
    if math.isinf(x) and not (allow_inf and x > 0):
        expected = "finite"
        if allow_inf:
            expected = "finite or +inf" if low is None else f"in [{low:g}, inf]"
        raise ValueError(f"{name} must be {expected}, got {x}")
    if low is not None and (x <= low if low_open else x < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {x:g}")
    if high is not None and x > high:
        raise ValueError(f"{name} must be <= {high:g}, got {x:g}")
    return x


def _scalar(x: Any) -> Any:
    """A 0-d real tensor or array (or numpy scalar) as its Python number.

    Anything else comes back unchanged, to be judged by the caller."""
    if type(x).__module__.startswith(("torch", "numpy")) and getattr(x, "ndim", None) == 0:
        dtype = str(getattr(x, "dtype", ""))
        if not any(k in dtype for k in ("bool", "complex")):
            return x.item()
    return x


@overload
def integer(
    name: str, x: Any, *, low: int | None = ..., allow_none: Literal[False] = ...
) -> int: ...
@overload
def integer(name: str, x: Any, *, low: int | None = ..., allow_none: bool) -> int | None: ...
def integer(name: str, x: Any, *, low: int | None = None, allow_none: bool = False) -> int | None:
    """``x`` as an int ``>= low`` (a bool is not an integer here)."""
    if x is None and allow_none:
        return None
    expected = "an integer" if low is None else f"an integer >= {low}"
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or (low is not None and x < low):
        raise ValueError(f"{name} must be {expected}, got {x!r}")
    return int(x)


@overload
def boolean(name: str, x: Any, *, allow_none: Literal[False] = ...) -> bool: ...
@overload
def boolean(name: str, x: Any, *, allow_none: bool) -> bool | None: ...
def boolean(name: str, x: Any, *, allow_none: bool = False) -> bool | None:
    """``x`` if it is a bool (``None`` only with ``allow_none``)."""
    if x is None and allow_none:
        return None
    if not isinstance(x, bool):
        raise ValueError(f"{name} must be True or False, got {x!r}")
    return x


def choice(name: str, x: Any, options: tuple) -> Any:
    """``x`` if it is one of ``options``."""
    if x not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {x!r}")
    return x

"""One validator per kind of user input; every public entry point uses these.

Each validator returns the value in its canonical type or raises the given
:class:`~mpu_bridge.errors.BridgeError` subclass with a message naming the input,
the value and what is accepted. Validation never uses ``assert`` (it holds under
``python -O``). No torch here.

Example::

    >>> positive_int("ep_size", numpy.int64(4))       # doctest: +SKIP
    4
    >>> positive_int("ep_size", True)                 # doctest: +SKIP
    Traceback (most recent call last):
    LayoutError: ep_size must be a positive integer, got True (bool)
"""

from __future__ import annotations

import argparse
import math
import operator
from typing import Any, Optional, Type

from .errors import BridgeError, LayoutError

__all__ = [
    "MAX_TIMEOUT_S",
    "integer",
    "positive_int",
    "optional_count",
    "optional_bool",
    "boolean",
    "seconds",
    "arg_positive_int",
    "arg_seconds",
]

#: The longest timeout accepted anywhere (30 days): finite, and far below what
#: ``datetime.timedelta`` and the store can represent.
MAX_TIMEOUT_S = 30 * 24 * 3600.0


def integer(name: str, value: Any, error: Type[BridgeError] = LayoutError) -> int:
    """``value`` as an int: Python or numpy integers; never a bool, float or string.

    Example: ``integer("rank", 3) == 3``; ``integer("rank", 3.0)`` raises.
    """
    if isinstance(value, bool):
        raise error(f"{name} must be an integer, got {value!r} (bool)")
    try:
        return operator.index(value)
    except TypeError:
        raise error(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None


def positive_int(name: str, value: Any, error: Type[BridgeError] = LayoutError) -> int:
    """``value`` as an int >= 1 (see :func:`integer`).

    Example: ``positive_int("tp", 2) == 2``; ``positive_int("tp", 0)`` raises.
    """
    if isinstance(value, bool):
        raise error(f"{name} must be a positive integer, got {value!r} (bool)")
    try:
        number = operator.index(value)
    except TypeError:
        raise error(
            f"{name} must be a positive integer, got {value!r} ({type(value).__name__})"
        ) from None
    if number < 1:
        raise error(f"{name} must be a positive integer, got {number}")
    return number


def optional_count(name: str, value: Any, error: Type[BridgeError] = LayoutError) -> Optional[int]:
    """None (no limit), or ``value`` as an int >= 0 (see :func:`integer`).

    Example: ``optional_count("max_groups", 8) == 8``; ``-1`` raises.
    """
    if value is None:
        return None
    number = integer(name, value, error)
    if number < 0:
        raise error(f"{name} must be None (no limit) or an integer >= 0, got {number}")
    return number


def boolean(name: str, value: Any, error: Type[BridgeError] = BridgeError) -> bool:
    """``value`` if it is a real ``bool`` (numpy's too); ``"no"``, 0 and None are refused.

    Example: ``boolean("verify_plan", False) is False``.
    """
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_" and type(value).__module__ == "numpy":
        return bool(value)
    raise error(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def optional_bool(name: str, value: Any, error: Type[BridgeError] = BridgeError) -> Optional[bool]:
    """``None`` or a real ``bool`` (see :func:`boolean`).

    Example: ``optional_bool("data_before_expert", None) is None``.
    """
    if value is None:
        return None
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return boolean(name, value, error)
    raise error(f"{name} must be True, False or None, got {value!r} ({type(value).__name__})")


def seconds(name: str, value: Any, error: Type[BridgeError] = BridgeError) -> float:
    """A finite, positive number of seconds, at most :data:`MAX_TIMEOUT_S` (30 days).

    Accepts int/float (numpy's too) and ``datetime.timedelta``. Example:
    ``seconds("agreement_timeout", 60) == 60.0``; ``float("inf")`` raises.
    """
    total = getattr(value, "total_seconds", None)
    if callable(total) and not isinstance(value, (int, float)):
        number = float(total())
    elif isinstance(value, bool) or not _is_real(value):
        raise error(
            f"{name} must be a positive number of seconds (or a datetime.timedelta), got {value!r} "
            f"({type(value).__name__})"
        )
    else:
        number = float(value)
    if not math.isfinite(number) or number <= 0 or number > MAX_TIMEOUT_S:
        raise error(
            f"{name} must be a positive number of seconds, finite and at most {MAX_TIMEOUT_S:g} "
            f"(30 days), got {value!r}"
        )
    return number


def _is_real(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, (str, bytes, complex))


# -- the same rules for command-line text (argparse ``type=`` callables) -------------------


def arg_positive_int(text: str) -> int:
    """A command-line positive integer; argparse reports the message.

    Example: ``arg_positive_int("8") == 8``; ``"0"`` and ``"2.5"`` raise ArgumentTypeError.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def arg_seconds(text: str) -> float:
    """A command-line timeout: finite, positive seconds, at most 30 days (see :func:`seconds`).

    Example: ``arg_seconds("60") == 60.0``; ``"inf"`` raises ArgumentTypeError.
    """
    try:
        return seconds("the timeout", float(text))
    except (ValueError, BridgeError):
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds (at most {MAX_TIMEOUT_S:g}), got {text!r}"
        ) from None

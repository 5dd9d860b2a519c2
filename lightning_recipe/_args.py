"""Argument checks shared by every callback: refuse bad values at construction, listing the choices."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, get_args

#: what a failed check does: stop ``fit`` with RecipeCheckError, or warn and let training go on
OnFail = Literal["raise", "warn"]
ON_FAIL_CHOICES: tuple[OnFail, ...] = get_args(OnFail)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` is one of ``choices``, of the same type: ``1 == True`` and ``0.0 == False``, so a plain
    ``in`` would let a number through where a flag is asked for."""
    choices = tuple(choices)
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"Expected `{name}` to be one of {list(choices)}, but got {value!r}.")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum}, but got {value!r}.")


def check_integer(name: str, value: Any) -> None:
    """Any integer (a label value, an index); ``True``/``False`` and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Expected `{name}` to be an integer, but got {value!r}.")


def check_positive(name: str, value: Any) -> None:
    """A finite number > 0: ``inf`` passes ``> 0`` but makes every threshold or step size meaningless."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"Expected `{name}` to be a finite positive number, but got {value!r}.")


def check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"Expected `{name}` to be a number in the (0, 1) range, but got {value!r}.")

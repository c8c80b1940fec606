"""Argument checks shared by the config and the sparse patterns, so every bad value reads the same way.

Each check raises a ValueError that names the argument, repeats the bad value and says what is allowed:
``"{name}={value!r} is not valid; it must be ..."`` (or ``"... choose one of ..."``).

This file is copied next to saved models and imported as remote code: it imports only the standard library.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "check_choice",
    "check_int_in_range",
    "check_non_negative_int",
    "check_positive_int",
    "check_probability",
    "is_int",
]


def _invalid(name: str, value: object, requirement: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not valid; it must be {requirement}.")


def is_int(value: object) -> bool:
    """A true integer: ``bool`` is an ``int`` subclass, but ``True`` is no size."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int_in_range(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    """An integer in ``[low, high]`` (either bound may be open)."""
    if is_int(value) and (low is None or value >= low) and (high is None or value <= high):
        return
    if low is not None and high is not None:
        requirement = f"an integer in [{low}, {high}]"
    elif low is not None:
        requirement = f"an integer >= {low}"
    elif high is not None:
        requirement = f"an integer <= {high}"
    else:
        requirement = "an integer"
    raise _invalid(name, value, requirement)


def check_positive_int(name: str, value: object) -> None:
    if not is_int(value) or value < 1:
        raise _invalid(name, value, "a positive integer")


def check_non_negative_int(name: str, value: object) -> None:
    if not is_int(value) or value < 0:
        raise _invalid(name, value, "a non-negative integer")


def check_probability(name: str, value: object) -> None:
    """A dropout-style probability in ``[0, 1)``; ``None`` (unset) passes."""
    if value is not None and not 0.0 <= float(value) < 1.0:
        raise _invalid(name, value, "a probability in [0, 1)")


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}.")


def register_by_name(registry: dict, cls: type) -> type:
    """Put a variant class into its registry under `cls.name` (the variant registries' one decorator body)."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered.")
    registry[cls.name] = cls
    return cls


def registered(registry: dict, field: str, name: object) -> type:
    """The class registered as `name`, or a ValueError naming the config field and the valid choices."""
    check_choice(field, name, registry)
    return registry[name]

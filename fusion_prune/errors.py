"""The one exception type for bad user input.

The CLI turns a :class:`BadInputError` into a single line on stderr and exit status 2; any other
exception is an internal error (exit status 1). Messages follow scikit-learn's shape: name the
parameter, say what was expected, and what was received.
"""

from __future__ import annotations

from typing import Any, Iterable


class BadInputError(ValueError):
    """Raised for input a user can fix: a missing file, an unknown name, a missing column."""


def bad_choice(param: str, value: Any, choices: Iterable[Any]) -> BadInputError:
    """Error for a value outside a known set: ``The 'x' parameter must be one of {...}. Got 'y'.``"""
    listed = ", ".join(repr(c) for c in sorted(choices, key=str))
    return BadInputError(f"The {param!r} parameter must be one of {{{listed}}}. Got {value!r} instead.")

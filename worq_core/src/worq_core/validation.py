"""Checks on the names users choose: queue names and job ids."""

from __future__ import annotations

import unicodedata

from worq_core.errors import InvalidNameError

MAX_NAME_LENGTH = 200
"""Longest queue name or job id, in characters (they become parts of broker keys)."""


def _check(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidNameError(what, repr(value), "it must be a string")
    if not value or value.isspace():
        raise InvalidNameError(what, value, "it must not be empty or blank")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidNameError(what, value, f"it is longer than {MAX_NAME_LENGTH} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value):
        raise InvalidNameError(what, value, "it contains control characters")
    if value != value.strip():
        raise InvalidNameError(what, value, "it must not start or end with whitespace")
    return value


def check_queue(name: object) -> str:
    """Return ``name`` if it is a valid queue name; raise :class:`InvalidNameError` if not."""
    return _check("queue name", name)


def check_job_id(job_id: object) -> str:
    """Return ``job_id`` if it is a valid job id; raise :class:`InvalidNameError` if not."""
    return _check("job id", job_id)

"""Errors of the store.

::

    StoreError              the store could not do what was asked
    ├── StoreUnavailable    transient: database locked, disk full, I/O error; retry later
    └── StoreSchemaError    the database was written by an incompatible version of caresync
"""

from __future__ import annotations

import sqlite3


class StoreError(Exception):
    """Raised when the store cannot complete an operation."""


class StoreUnavailable(StoreError):
    """Raised on transient failures (locked, disk full, I/O): nothing was committed; retry."""


class StoreSchemaError(StoreError):
    """Raised when the database schema version is newer than this build understands."""


_TRANSIENT_HINTS = ("locked", "busy", "disk", "full", "i/o", "readonly", "unable to open")


def map_sqlite_error(exc: sqlite3.Error, what: str) -> StoreError:
    """Map a sqlite3 error raised while doing ``what`` to StoreUnavailable or StoreError."""
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and any(h in text for h in _TRANSIENT_HINTS):
        return StoreUnavailable(f"{what}: {exc}")
    return StoreError(f"{what}: {exc}")

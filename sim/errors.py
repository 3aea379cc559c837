"""Errors of the simulators.

::

    SimError                 a simulated system could not do what was asked
    ├── RequestRejected      terminal: bad body, unknown operation, key reused for another
    │                        operation; the caller must not retry (reply ``transient: false``)
    ├── SimUnavailable       transient: the simulator's own database failed, or a fault
    │                        injected with ``caresync sim fail``; retry later
    └── SimAlreadyRunning    another simulator already answers on the same subject prefix
"""

from __future__ import annotations


class SimError(Exception):
    """Raised when a simulated system cannot complete a request."""

    transient = False


class RequestRejected(SimError):
    """Raised when a request is invalid: retrying the same request can never succeed."""


class SimUnavailable(SimError):
    """Raised when the system cannot answer now (database error, injected fault): retry."""

    transient = True


class SimAlreadyRunning(SimError):
    """Raised at start when another simulator already answers on the same subject prefix."""

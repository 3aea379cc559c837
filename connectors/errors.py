"""Errors of the downstream connectors.

::

    ConnectorError             a call to a downstream system did not succeed
    ├── TransientError         it may succeed later: retried with back-off (down, timeout, 5xx)
    ├── PermanentError         retrying cannot help: the effect fails (4xx, refused, bad reply)
    └── ConnectorSetupError    the connector cannot start (its durable consumer, its endpoint)

Lower-layer errors (nats-py, httpx) are mapped to these at the boundary, ``raise ... from exc``.
"""

from __future__ import annotations


class ConnectorError(Exception):
    """Raised when a connector cannot do what was asked; see the subclasses."""


class TransientError(ConnectorError):
    """Raised when a call failed in a way that may pass: the system is down (no responders,
    connection refused), slow (timeout), overloaded (408, 429, 5xx), or said so itself
    (``{"transient": true}``).  ``retry_after_s`` is the delay the system asked for, if any.
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentError(ConnectorError):
    """Raised when the system refused the call for good (other 4xx, ``{"transient": false}``)
    or answered something that is not a reply of the contract: the effect fails, it is not
    retried.
    """


class ConnectorSetupError(ConnectorError):
    """Raised when a connector cannot start: its durable consumer cannot be created or updated,
    or its configuration names no usable endpoint.
    """

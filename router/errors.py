"""Errors of the router runtime.

::

    RouterError              the router cannot run as configured
    ├── ProvisioningError    streams/consumers cannot be created or updated as configured
    └── RouterStopped        an operation needs a running router and it has stopped

Bad input is not an error of the router: it is dead-lettered (see caresync.codecs.errors).
"""

from __future__ import annotations


class RouterError(Exception):
    """Raised when the router cannot start or continue as configured."""


class ProvisioningError(RouterError):
    """Raised when a stream or consumer cannot be created or updated to the configured shape."""


class RouterStopped(RouterError):
    """Raised when an operation needs a running router and it has stopped."""

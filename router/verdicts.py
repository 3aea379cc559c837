"""Asking the router what became of a message (``<prefix>.ctl.verdict``) until it has decided.

Used by every client that waits for a verdict: ``caresync publish``, ``caresync dlq retry``
and the raw submitter behind ``publish --format`` and the MLLP listener.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import nats.errors
import orjson
from nats.aio.client import Client as NatsClient

from caresync.router.errors import RouterError

FINAL = frozenset({"accepted", "duplicate", "rejected", "parked"})
"""Verdicts that will not change."""


class NoRouterAnswer(RouterError):
    """Raised when no router answers a verdict request (and the caller does not wait for one)."""


async def poll_verdict(
    nc: NatsClient,
    subject: str,
    body: dict[str, Any],
    wait_s: float,
    decided: Callable[[dict[str, Any]], bool],
    *,
    wait_for_router: bool = True,
) -> tuple[dict[str, Any] | None, bool]:
    """Ask until a reply is ``decided``, backing off from 10 to 200 ms, for up to ``wait_s``.

    Returns the deciding reply (None if none came in time) and whether any router answered
    at all.  ``wait_for_router``: no responder (a router restarting) is asked again; else it
    raises :class:`NoRouterAnswer` naming the subject.
    """
    payload = orjson.dumps(body)
    delay = 0.01
    answered = False
    with anyio.move_on_after(wait_s):
        while True:
            timeout_s = min(wait_s, 5.0)
            try:
                reply = await nc.request(subject, payload, timeout=timeout_s)
                answered = True
                found: dict[str, Any] = orjson.loads(reply.data)
                if decided(found):
                    return found, True
            except nats.errors.NoRespondersError:
                if not wait_for_router:
                    raise NoRouterAnswer(
                        f"no router is serving {subject} on this NATS server"
                    ) from None
            except nats.errors.TimeoutError:
                if not wait_for_router:
                    raise NoRouterAnswer(f"no answer on {subject} within {timeout_s:g} s") from None
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.2)
    return None, answered

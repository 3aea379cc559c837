"""The simulators on NATS: billing, ERP and supply plus their control subjects, one connection.

One task per system (:mod:`caresync.sim.endpoint`), one for control requests, one publishing
feedback to caresync (:mod:`caresync.sim.feedback`), all in one task group.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import anyio
import nats.errors
import structlog
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NatsClient

from caresync.codecs import Subjects
from caresync.router.jetstream import connect
from caresync.sim.control import Control
from caresync.sim.endpoint import SystemEndpoint, reply_json, sync_with_server
from caresync.sim.errors import SimAlreadyRunning, SimUnavailable
from caresync.sim.faults import DEFAULT_SLOW_DELAY_S, SYSTEMS, FaultBoard
from caresync.sim.feedback import FeedbackPublisher
from caresync.sim.records import Records
from caresync.sim.systems import Systems, error_reply

log = structlog.get_logger("caresync.sim")

_PROBE_TIMEOUT_S = 0.5


@dataclass(frozen=True, slots=True)
class SimSettings:
    """Where the simulators listen and where their feedback goes."""

    sim_prefix: str = "sim"
    """First subject token(s) of requests: ``<sim_prefix>.<system>.<operation>``."""
    router_prefix: str = "cs"
    """The router's subject prefix: feedback goes to ``<router_prefix>.in.<kind>.<entity>``."""
    slow_delay_s: float = DEFAULT_SLOW_DELAY_S
    """Answer delay of ``slow`` mode when the fail request names none."""
    connect_timeout_s: float = 3.0
    """Timeout of one connection attempt; the first connection gets about twice that."""


class SimServer:
    """Serves the three simulated systems; ``async with SimServer(...)`` or ``await run()``."""

    def __init__(
        self,
        nats_url: str,
        db_path: Path,
        settings: SimSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nats_url = nats_url
        self.db_path = db_path
        self.settings = settings or SimSettings()
        self.faults = FaultBoard()
        self._clock = clock
        self._endpoints: dict[str, SystemEndpoint] = {}
        self._tg: TaskGroup | None = None

    async def settle(self, system: str, timeout_s: float = 2.0) -> bool:
        """After a fault change: wait until ``system`` is subscribed exactly when not down.

        Returns False if that did not happen within ``timeout_s`` (or nothing is served yet).
        """
        endpoint = self._endpoints.get(system)
        return endpoint is not None and await endpoint.settle(timeout_s)

    async def __aenter__(self) -> SimServer:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._tg.start(self.run)
        except BaseException:
            self._tg.cancel_scope.cancel()
            # The group holds only run()'s own failure: raise that one, unwrapped.
            with contextlib.suppress(BaseExceptionGroup):
                await self._tg.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(et, ev, tb)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, open the records and serve until cancelled.

        Raises SimAlreadyRunning when another simulator answers on the same prefix,
        SimUnavailable when the records cannot be opened, and TimeoutError when NATS cannot
        be reached within twice ``connect_timeout_s``.
        """
        # connect() reconnects forever, the first connection included: bound the first one.
        with anyio.fail_after(self.settings.connect_timeout_s * 2 + 1):
            nc = await connect(
                self.nats_url,
                name="caresync-sim",
                connect_timeout_s=self.settings.connect_timeout_s,
            )
        try:
            await self._refuse_if_taken(nc)
            async with await Records.open(self.db_path) as records:
                publisher = FeedbackPublisher(nc.jetstream(), records)
                router = Subjects(prefix=self.settings.router_prefix)
                systems = Systems(records, router, publisher.wake)
                control = Control(self, records, systems, publisher, self._clock)
                async with anyio.create_task_group() as tg:
                    await tg.start(publisher.run)
                    for system in SYSTEMS:
                        endpoint = SystemEndpoint(
                            system,
                            nc=nc,
                            sim_prefix=self.settings.sim_prefix,
                            faults=self.faults,
                            clock=self._clock,
                            systems=systems,
                            records=records,
                        )
                        self._endpoints[system] = endpoint
                        await tg.start(endpoint.serve)
                    await tg.start(self._serve_control, nc, control)
                    log.info("sim_ready", prefix=self.settings.sim_prefix, db=str(self.db_path))
                    task_status.started()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await nc.close()

    async def _refuse_if_taken(self, nc: NatsClient) -> None:
        subject = f"{self.settings.sim_prefix}.control.report"
        try:
            await nc.request(subject, b"{}", timeout=_PROBE_TIMEOUT_S)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return
        raise SimAlreadyRunning(
            f"another simulator already serves the prefix {self.settings.sim_prefix!r}"
        )

    async def _serve_control(
        self, nc: NatsClient, control: Control, *, task_status: TaskStatus[None]
    ) -> None:
        sub = await nc.subscribe(f"{self.settings.sim_prefix}.control.*")
        await sync_with_server(nc)  # ready means the server routes control requests to us
        task_status.started()
        try:
            async for msg in sub.messages:
                op = msg.subject.rsplit(".", 1)[-1]
                try:
                    reply = await control.handle(op, msg.data)
                except Exception as exc:  # a bad request must never take the simulator down
                    log.warning("sim_control_failed", op=op, error=str(exc))
                    reply = error_reply(SimUnavailable(f"{type(exc).__name__}: {exc}"))
                await reply_json(nc, msg, reply)
        finally:
            with anyio.CancelScope(shield=True):
                if not nc.is_closed:
                    try:
                        await sub.unsubscribe()
                    except nats.errors.Error:
                        pass

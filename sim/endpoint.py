"""One simulated system on NATS: its subscription, its buffer, and what its fault makes it do.

The system subscribes to ``<sim prefix>.<system>.>`` with a callback that only appends to
its own buffer; one task reads that buffer and answers.  ``down`` removes the subscription
(callers get no-responders from the server) until the fault expires or is healed; requests
already buffered, and ``slow`` answers still waiting, when the system goes down are dropped
unanswered and counted as refused.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import anyio
import nats.errors
import orjson
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from caresync.sim.errors import SimUnavailable
from caresync.sim.faults import FaultBoard
from caresync.sim.records import Records
from caresync.sim.schema import CounterName
from caresync.sim.systems import Request, Systems, error_reply

log = structlog.get_logger("caresync.sim")

_BATCH = 256  # requests recorded in one transaction
_UNSUBSCRIBE_TIMEOUT_S = 2.0


async def reply_json(nc: NatsClient, msg: Msg, body: dict[str, Any]) -> None:
    """Answer a request (if it expects an answer); a failure to send is only logged."""
    # Not msg.respond(): nats-py would echo the request's headers on the reply.
    if msg.reply and not nc.is_closed:
        try:
            await nc.publish(msg.reply, orjson.dumps(body))
        except nats.errors.Error as exc:
            log.warning("sim_reply_failed", subject=msg.subject, error=str(exc))


async def sync_with_server(nc: NatsClient, timeout_s: float = 5.0) -> None:
    """Return once the server has processed every command this client sent before.

    Not ``nc.flush()``: nats-py (2.16) writes its PING straight to the socket, ahead of
    commands still buffered, so a PONG does not prove that an earlier SUB or UNSUB arrived.
    A message to our own inbox travels behind them, in order.
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    await nc.publish(inbox, b"")
    await sub.next_msg(timeout=timeout_s)


class SystemEndpoint:
    """Serves one system's requests, honouring its fault on the :class:`FaultBoard`."""

    def __init__(
        self,
        system: str,
        *,
        nc: NatsClient,
        sim_prefix: str,
        faults: FaultBoard,
        clock: Callable[[], float],
        systems: Systems,
        records: Records,
    ) -> None:
        self.system = system
        self._nc = nc
        self._prefix = f"{sim_prefix}.{system}."
        self._faults = faults
        self._clock = clock
        self._systems = systems
        self._records = records
        self._buf: deque[Msg] = deque()
        self._wake = anyio.Event()
        self._delayed: Counter[str] = Counter()
        self._up = False  # subscribed, and the server has seen it
        self._settled = anyio.Event()

    def is_down(self) -> bool:
        """Whether a ``down`` fault is in force now."""
        fault = self._faults.current(self.system, self._clock())
        return fault is not None and fault.mode == "down"

    async def settle(self, timeout_s: float) -> bool:
        """After a fault change: wait until subscribed exactly when not down (False: timed out)."""
        self._wake.set()
        with anyio.move_on_after(timeout_s):
            while self._up == self.is_down():
                await self._settled.wait()
            return True
        return False

    async def _on_msg(self, msg: Msg) -> None:
        # The only work done in a nats-py callback: nothing here can fail.
        self._buf.append(msg)
        self._wake.set()

    def _set_up(self, up: bool) -> None:
        self._up = up
        self._settled.set()
        self._settled = anyio.Event()

    def _operation(self, subject: str) -> str:
        return subject[len(self._prefix) :]

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, unsubscribed while down; ready once first subscribed."""
        ready: TaskStatus[None] = task_status
        while True:
            self._wake = anyio.Event()
            fault = self._faults.current(self.system, self._clock())
            if fault is not None and fault.mode == "down":
                with anyio.move_on_after(fault.remaining_s(self._clock())):
                    await self._wake.wait()
                continue
            sub = await self._nc.subscribe(
                self._prefix + ">", cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
            )
            await sync_with_server(self._nc)  # callers are answered from now on
            self._set_up(True)
            ready.started()
            ready = anyio.TASK_STATUS_IGNORED
            log.info("sim_system_up", system=self.system)
            try:
                await self._serve_until_down()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(_UNSUBSCRIBE_TIMEOUT_S):
                    if not self._nc.is_closed:
                        try:
                            await sub.unsubscribe()
                            await sync_with_server(self._nc)
                        except nats.errors.Error:
                            pass
            self._set_up(False)
            log.warning("sim_system_down", system=self.system)
            await self._count_refused()

    async def _count_refused(self) -> None:
        refused = self._delayed + Counter(self._operation(m.subject) for m in self._buf)
        self._buf.clear()
        self._delayed.clear()
        counts: list[tuple[str, str, CounterName, int]] = [
            (self.system, op[:64], "refused", n) for op, n in refused.items() if n
        ]
        try:
            await self._records.count_many(counts)
        except SimUnavailable as exc:
            log.warning("sim_count_failed", system=self.system, error=str(exc))

    async def _serve_until_down(self) -> None:
        async with anyio.create_task_group() as delayed:
            while True:
                fault = self._faults.current(self.system, self._clock())
                if fault is not None and fault.mode == "down":
                    delayed.cancel_scope.cancel()
                    return
                if not self._buf:
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    continue
                if fault is not None and fault.mode == "slow":
                    msg = self._buf.popleft()
                    operation = self._operation(msg.subject)
                    delayed.start_soon(self._answer_later, operation, msg, fault.delay_s)
                    continue
                batch = [self._buf.popleft() for _ in range(min(len(self._buf), _BATCH))]
                if fault is not None and fault.mode == "errors":
                    failing = error_reply(SimUnavailable(f"{self.system} is failing (injected)"))
                    for msg in batch:
                        await reply_json(self._nc, msg, failing)
                    ops = [self._operation(m.subject) for m in batch]
                    await self._systems.count_errors(self.system, ops)
                else:
                    await self._answer(batch)

    async def _answer_later(self, operation: str, msg: Msg, delay_s: float) -> None:
        self._delayed[operation] += 1
        await anyio.sleep(delay_s)  # cancelled when the system goes down: counted as refused
        self._delayed[operation] -= 1
        with anyio.CancelScope(shield=True):
            await self._answer([msg])

    async def _answer(self, batch: list[Msg]) -> None:
        requests = [Request(self._operation(m.subject), m.data, m.headers) for m in batch]
        try:
            replies = await self._systems.handle_many(self.system, requests)
        except Exception as exc:  # a bug must not take the simulator down: say so and go on
            log.exception("sim_request_failed", system=self.system)
            replies = [error_reply(SimUnavailable(f"{type(exc).__name__}: {exc}"))] * len(batch)
        for msg, reply in zip(batch, replies, strict=True):
            await reply_json(self._nc, msg, reply)

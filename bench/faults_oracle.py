"""The oracle of the fault tests: the pure actors run on the same reference data and commands.

:class:`Oracle` holds what the router must have done with everything sent so far;
:func:`load_refdata` loads the reference data into a deployment and starts the oracle from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from caresync.bench import fanout as fo
from caresync.bench.expected import Address, Expected, PureRouter, Sent, run_pure
from caresync.bench.faults_deploy import Deployment, SoakError, poll
from caresync.bench.faults_stores import read_only
from caresync.bench.refdata import read_back
from caresync.bench.workflow_data import write_csv
from caresync.cli.refdata import stock_commands

CROSSING_KINDS = frozenset({"purchasing.purchase_order", "erp.purchase_order"})
"""Effects that exist only because an item crossed its reorder point (the order to the
facility's purchasing actor, and its call to ERP): which crossings happen depends on how
appointments interleave at the item actors, so they are checked against the items' own record
of crossings, not against the pure run."""


@dataclass
class Oracle:
    """What the router must have done: every message sent so far, through the pure actors."""

    pure: PureRouter
    expected: Expected = field(default_factory=Expected)

    def send(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Messages (subject, data) in the order they are published."""
        run_pure(self.pure, messages, into=self.expected)

    def applied(self) -> set[Address]:
        """Every command that must be applied, crossing-dependent ones aside."""
        crossing = {s.address for s in self.expected.internal.values() if is_crossing(s)}
        return self.expected.applied - crossing

    def effects(self) -> set[str]:
        """Keys of every effect (internal or downstream), crossing-dependent ones aside."""
        sent = (*self.expected.internal.values(), *self.expected.downstream.values())
        return {s.key for s in sent if not is_crossing(s)}

    def downstream(self, system: str | None = None) -> dict[str, Sent]:
        """Downstream effects by key (of one system), crossing-dependent ones aside."""
        return {
            key: sent
            for key, sent in self.expected.downstream.items()
            if not is_crossing(sent) and (system is None or sent.kind.partition(".")[0] == system)
        }


def is_crossing(sent: Sent) -> bool:
    """Whether ``sent`` exists only because an item crossed its reorder point."""
    return sent.kind in CROSSING_KINDS


async def load_refdata(
    dep: Deployment, alive: Callable[[], None], *, appointments: int, seed: int
) -> Oracle:
    """``caresync refdata load`` of the workflow bench's reference data (sized for
    ``appointments``); returns once the router keeps that version and applied the stock."""
    directory = dep.data_dir.parent / f"{dep.prefix}-refdata"
    write_csv(directory, appointments, seed)
    try:
        loaded = await fo.load_refdata(
            dep.url, directory, dep.env, dep.data_dir.parent / f"{dep.prefix}-refdata.log"
        )
    except fo.BenchError as exc:
        raise SoakError(str(exc)) from None
    version = int(loaded["version"])
    oracle = Oracle(PureRouter(dep.subjects, read_back(directory, version)))
    stock = stock_commands(dep.subjects, oracle.pure.refdata.dataset, version)
    oracle.send((o.subject, o.payload) for o in stock)

    def loaded_and_stocked() -> bool:
        with read_only(dep.db_path) as conn:
            kept = conn.execute(
                "SELECT count(*) FROM refdata_versions WHERE version = ?", (version,)
            )
            applied = conn.execute("SELECT count(*) FROM applied WHERE command_id LIKE 'stock:%'")
            return bool(kept.fetchone()[0]) and int(applied.fetchone()[0]) >= len(stock)

    await poll(loaded_and_stocked, alive, deadline_s=60.0, what="the reference data and stock")
    return oracle


def expected_progress(oracle: Oracle) -> int:
    """About what :func:`~caresync.bench.faults_stores.progress` reaches once everything
    sent so far is done."""
    effects = len(oracle.expected.downstream)
    return len(oracle.expected.applied) + 2 * effects  # an acknowledgement and a call each

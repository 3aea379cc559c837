"""Deterministic simulation of the workflow actors under the router's delivery guarantees.

One seed is one run: a generated workload of source commands (scheduling, charges, coverage,
stock counts, ERP feedback) goes through a model of the router, with a seeded scheduler that
picks what happens next, and invariants are checked as it goes.  Nothing here reads a clock or
iterates a set, so the same seed gives the same run in any process.

The model is the one ``router/worker.py`` and ``router/batch_apply.py`` implement, not a freer one:

* Every entity has an input log (its mailbox): messages are applied strictly in log order,
  one entity at a time, and the scheduler interleaves entities at random.
* Applying is not committing: applied commands form an open batch (state, dedupe record and
  effects) that a *commit* step makes durable.  A *crash* loses the open batch and every live
  state; the uncommitted messages stay in their logs and are applied again (at-least-once),
  states come back from their stored msgpack bytes.
* Effects go to a per-(sender, target) outbox channel at commit and are *published* (appended
  to the target's log, or to a system's output stream) later, one step each, so an effect can
  be delayed arbitrarily and effects from different senders interleave; one sender's effects to
  one target keep their order.  Published effects are confirmed by the next commit; a crash
  before that publishes them again (same id: the receiver's dedupe drops them).
* A command id already applied to an entity (or seen earlier in the open batch) is skipped.
  Committed messages are also redelivered at random, and sources resend some messages.
* Connectors deliver each system's output stream in order, record what the system took, and
  publish ``downstream_ack`` (id ``ack:<effect key>``) to the owning actor; a connector may
  crash before acknowledging an effect and deliver it again (a ``duplicate`` outcome with the
  same ack id), or give up on it (``failed``).  ERP answers a new purchase order with
  ``item.po_acknowledged`` and, sometimes, ``item.goods_received`` (whole or in parts).
* Cross-entity order is free; the order within one entity's log never changes.

Invariants (see :class:`Checker`) are checked when a command is applied, after every commit,
and in full whenever the network is quiescent (nothing in flight); at the end every entity's
history is replayed from its initial state.  A violation raises :class:`Violation`, whose
message names the seed, the command that re-runs it, and the last steps.

The simulation is split by topic; this module is its public face (what ``test_dsim.py`` uses):

* :mod:`dsim_workload`: the seeded workload (messages, profiles, the source log);
* :mod:`dsim_runtime`: the runtime model (:class:`Sim`: logs, batches, commits, crashes,
  outbox channels);
* :mod:`dsim_connectors`: the connectors and ERP's feedback;
* :mod:`dsim_checks`: the invariants checked as it runs (:class:`Checker`, the crossing
  tracker), :class:`Violation`, :data:`KNOWN_BUGS`, :func:`rerun_command`;
* :mod:`dsim_settled`: the invariants checked whenever the network is quiescent.
"""

from __future__ import annotations

from collections.abc import Iterable

from dsim_checks import KNOWN_BUGS, Checker, Violation, rerun_command
from dsim_connectors import Connector
from dsim_runtime import Record, Shadow, Sim
from dsim_settled import Settled, card, consumption
from dsim_workload import (
    CHARGE_CODES,
    FACILITIES,
    ITEMS,
    LONG,
    OFFSETS,
    PAYERS,
    PROCEDURES,
    PROFILES,
    SCHEDULING,
    SHORT,
    SYSTEMS,
    Key,
    Message,
    Profile,
    generate,
    source,
)

from caresync.actors import Registry

__all__ = [
    "CHARGE_CODES",
    "FACILITIES",
    "ITEMS",
    "KNOWN_BUGS",
    "LONG",
    "OFFSETS",
    "PAYERS",
    "PROCEDURES",
    "PROFILES",
    "SCHEDULING",
    "SHORT",
    "SYSTEMS",
    "Checker",
    "Connector",
    "Key",
    "Message",
    "Profile",
    "Record",
    "Settled",
    "Shadow",
    "Sim",
    "Violation",
    "card",
    "consumption",
    "generate",
    "rerun_command",
    "run",
    "source",
]


def run(
    seed: int,
    profile: Profile = SHORT,
    *,
    registry: Registry | None = None,
    skip: Iterable[str] = KNOWN_BUGS,
) -> Sim:
    """Run one seed to the end; raises :class:`Violation` when an invariant fails."""
    sim = Sim(seed, profile, registry=registry, skip=skip)
    try:
        sim.run()
    except Violation:
        raise
    except Exception as exc:
        what = f"{type(exc).__name__}: {exc}"
        raise Violation(sim.describe(what)) from exc
    return sim

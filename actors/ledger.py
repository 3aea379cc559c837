"""The sync ledger: per entity and per downstream system, what we want it to have and what it
acknowledged.

An owning actor (billing, supply, ERP) records every effect it sends downstream with
:func:`sent`, and the connector's acknowledgement with :func:`acknowledged`.  ``wanted`` is the
version we want the system to have (effects sent), ``acked`` the version it confirmed; the state
is ``in_sync`` when nothing is waiting, ``pending`` while effects await their acknowledgement,
and ``failed`` once an effect failed for good (until a later one succeeds).  ``parked`` is
reported by the runtime, which knows when an entity is parked.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from caresync.codecs.downstream import DownstreamAck

__all__ = ["DownstreamAck", "Ledger", "SyncState", "acknowledged", "sent", "settled"]

SyncState = Literal["in_sync", "pending", "failed", "parked"]

MAX_REFERENCES = 20
"""References kept per ledger (the most recent ones)."""


class Ledger(msgspec.Struct, kw_only=True, frozen=True):
    """Sync position of one entity (or one appointment's share of it) at one system."""

    wanted: int = 0
    acked: int = 0
    pending: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    last_error: str = ""
    references: dict[str, str] = msgspec.field(default_factory=dict)
    """Effect key to the reference the system gave it (PO number, charge id...)."""

    @property
    def state(self) -> SyncState:
        """``failed`` while any effect failed for good, else ``pending`` or ``in_sync``."""
        if self.failed:
            return "failed"
        return "pending" if self.pending else "in_sync"


def settled(ledger: Ledger) -> bool:
    """Nothing waiting and nothing failed: the entry can be forgotten once its case is closed."""
    return not ledger.pending and not ledger.failed


def sent(ledger: Ledger, keys: tuple[str, ...]) -> Ledger:
    """Effects sent: the wanted version moves on, they wait for their acknowledgement."""
    new = tuple(k for k in keys if k not in ledger.pending)
    if not new:
        return ledger
    return msgspec.structs.replace(
        ledger, wanted=ledger.wanted + len(new), pending=(*ledger.pending, *new)
    )


def acknowledged(ledger: Ledger, ack: DownstreamAck) -> Ledger:
    """Apply an acknowledgement; one for an effect not pending changes nothing, except that a
    failed effect sent again (``caresync retry-failed``) leaves ``failed`` once it succeeds."""
    if ack.effect_key in ledger.failed and ack.effect_key not in ledger.pending:
        if ack.outcome == "failed":
            return msgspec.structs.replace(ledger, last_error=ack.error)
        failed = tuple(k for k in ledger.failed if k != ack.effect_key)
        return msgspec.structs.replace(
            ledger,
            failed=failed,
            acked=ledger.acked + 1,
            last_error=ledger.last_error if failed else "",
        )
    if ack.effect_key not in ledger.pending:
        return ledger
    pending = tuple(k for k in ledger.pending if k != ack.effect_key)
    if ack.outcome == "failed":
        return msgspec.structs.replace(
            ledger,
            pending=pending,
            failed=(*ledger.failed, ack.effect_key),
            last_error=ack.error,
        )
    references = ledger.references
    if ack.reference:
        # Only the latest references are kept: the ledger of a busy entity must not grow
        # without bound (the systems keep theirs; the connector records every call).
        kept = list(ledger.references.items())[-(MAX_REFERENCES - 1) :]
        references = {**dict(kept), ack.effect_key: ack.reference}
    return msgspec.structs.replace(
        ledger, pending=pending, acked=ledger.acked + 1, references=references
    )

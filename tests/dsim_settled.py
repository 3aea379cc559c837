"""The invariants that hold whenever the simulated network is quiescent (nothing in flight).

Numbers as in the issue: (1) reservations, consumption and demand in the item, supply and ERP
actors (the last two per appointment, by facility) equal what the cards and charge lines of the
cases say, and so do the deltas their systems were told and the ERP postings; (2) on order is
the POs sent minus the goods received; (3) POs sent = crossings counted by the item = crossings
seen by the oracle, each PO sent once by its facility's purchasing actor and taken once by ERP;
(4) charges only for lines posted to a performed case, each billed once, and each procedure's
charges and status as its case's; every ledger settled; live states equal their stored bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from dsim_workload import FACILITIES, SYSTEMS, Key

from caresync.actors import Effect
from caresync.actors import item as item_actor
from caresync.actors.refdata import RefData

if TYPE_CHECKING:
    from dsim_runtime import Sim


def card(refdata: RefData, details: Any) -> Counter[str]:
    """What the preference cards ask for a booking (the provider's own card wins)."""
    wanted: Counter[str] = Counter()
    for proc in details.procedures:
        provider = proc.provider_id or (details.providers[0] if details.providers else "")
        for item_id, quantity in refdata.preference_card(proc.code, provider or None):
            wanted[item_id] += quantity
    return +wanted


def consumption(refdata: RefData, charges: Iterable[Any]) -> Counter[str]:
    """Supply charge lines matched to items by charge code; credits give back."""
    used: Counter[str] = Counter()
    for line in charges:
        found = refdata.item_by_charge_code(line.code)
        if found is not None:
            used[found.item_id] += -line.quantity if line.type == "credit" else line.quantity
    return Counter({i: q for i, q in used.items() if q})


def _unit_cost(refdata: RefData, item_id: str) -> Decimal:
    found = refdata.item(item_id)
    return Decimal(str(found.unit_cost)) if found is not None else Decimal(0)


def _nonzero(counts: Counter[Any]) -> Counter[Any]:
    return Counter({k: v for k, v in counts.items() if v})


LEDGER_KINDS = (*SYSTEMS, "purchasing")
"""The actor kinds that keep a sync ledger with a downstream system."""


class Settled:
    """The full checks of one quiescent moment, over the store and every effect committed."""

    def __init__(
        self, sim: Sim, emitted: dict[str, tuple[Key, Effect]], skip: frozenset[str]
    ) -> None:
        self.sim = sim
        self.emitted = emitted
        """Every downstream effect committed, by idempotency key."""
        self.skip = skip

    def fail(self, what: str) -> None:
        self.sim.fail(what)

    def check(self) -> None:
        """Every invariant above; raises :class:`dsim_checks.Violation` at the first that fails."""
        sim = self.sim
        sim.note("quiescent: full check")
        for key in sim.stored:
            if key in sim.live and sim.live[key] != sim.stored_state(key):
                self.fail(f"{key[0]}:{key[1]} live state differs from its stored bytes")
        appointments = {k[1]: sim.stored_state(k) for k in sim.entities("appointment")}
        self._stock(appointments)
        self._orders()
        self._charges(appointments)
        self._ledgers()
        if "billing_reversal_once" not in self.skip:
            self._billing_mirrors_case(appointments)

    def _stock(self, appointments: dict[str, Any]) -> None:
        """(1) Reservations are the cards of booked cases, consumption that of completed ones,
        in the item, supply and ERP actors alike, and in what their systems were told."""
        sim, refdata = self.sim, self.sim.refdata
        # (facility, appointment) -> item -> quantity, from the cards and the charge lines
        reserved: dict[tuple[str, str], Counter[str]] = {}
        consumed: dict[tuple[str, str], Counter[str]] = {}
        demand: dict[tuple[str, str], Counter[tuple[str, str]]] = {}
        for appt, a in appointments.items():
            where = (a.details.facility_id if a.details else "", appt)
            if a.status == "booked":
                reserved[where] = card(refdata, a.details)
                demand[where] = Counter({(i, a.local_date): q for i, q in reserved[where].items()})
            elif a.status == "completed":
                consumed[where] = consumption(refdata, a.charges)
        for key in sim.entities("item"):
            item = sim.stored_state(key)
            item_id, _, facility = key[1].partition("@")
            want = {appt: c[item_id] for (f, appt), c in reserved.items() if f == facility}
            if item.reservations != {appt: q for appt, q in want.items() if q}:
                self.fail(f"{key[1]} reserves {item.reservations}; booked cards say {want}")
            used = sum(c[item_id] for (f, _), c in consumed.items() if f == facility)
            if item.consumed != used:
                self.fail(f"{key[1]} consumed {item.consumed}; completed cases used {used}")
        # Supply and ERP are keyed by appointment and hold the case's share per facility.
        owners = {k[1] for kind in ("supply", "erp") for k in sim.entities(kind)}
        for appt in sorted(set(appointments) | owners):
            supply = sim.stored_state(("supply", appt))
            erp = sim.stored_state(("erp", appt))
            places = set(FACILITIES) | set(supply.reservations) | set(supply.consumed)
            for facility in sorted(places | set(erp.demand)):
                holds = (supply.reservations.get(facility, {}), supply.consumed.get(facility, {}))
                case: tuple[dict[str, int], dict[str, int]] = (
                    reserved.get((facility, appt), {}),
                    consumed.get((facility, appt), {}),
                )
                if holds != case:
                    self.fail(f"supply {appt} holds {holds} at {facility}; its case says {case}")
                got: Counter[tuple[str, str]] = Counter()
                for line in erp.demand.get(facility, ()):
                    got[(line.item_id, line.date)] += line.quantity
                if got != demand.get((facility, appt), Counter()):
                    self.fail(f"ERP {appt} demand at {facility} is {dict(got)}")
        self._told(refdata)

    def _told(self, refdata: RefData) -> None:
        """What the supply and ERP systems were told adds up to what the actors hold; the
        ERP postings add up to the cost of what was consumed, per facility (the items) and per
        case (its ERP actor and its supply consumption)."""
        sim = self.sim
        told: Counter[tuple[str, ...]] = Counter()
        posted: dict[str, Decimal] = {}
        """Amount ERP was told was posted, by facility."""
        posted_for: dict[str, Decimal] = {}
        """The same, by appointment."""
        for _, effect in self.emitted.values():
            p = effect.payload
            if effect.name in ("reservation", "consumption"):
                for line in p["lines"]:
                    told[(effect.name, p["facility_id"], line["item_id"])] += line["quantity"]
            elif effect.name == "demand":
                for line in p["lines"]:
                    where = (p["facility_id"], line["item_id"], line["date"])
                    told[("demand", *where)] += line["quantity"]
            elif effect.name == "posting":
                amount, case = Decimal(p["amount"]), p["appointment_id"]
                posted[p["facility_id"]] = posted.get(p["facility_id"], Decimal(0)) + amount
                posted_for[case] = posted_for.get(case, Decimal(0)) + amount
        held: Counter[tuple[str, ...]] = Counter()
        cost: Counter[str] = Counter()
        for key in sim.entities("item"):
            item = sim.stored_state(key)
            item_id, _, facility = key[1].partition("@")
            held[("reservation", facility, item_id)] += item.reserved
            held[("consumption", facility, item_id)] += item.consumed
            cost[facility] += _unit_cost(refdata, item_id) * item.consumed
        for facility in FACILITIES:
            if posted.get(facility, Decimal(0)) != cost[facility]:
                self.fail(f"ERP got postings of {posted.get(facility)} for {facility}; {cost}")
        for appt in sorted({k[1] for kind in ("supply", "erp") for k in sim.entities(kind)}):
            erp = sim.stored_state(("erp", appt))
            supply = sim.stored_state(("supply", appt))
            used = sum(
                (
                    _unit_cost(refdata, item_id) * quantity
                    for lines in supply.consumed.values()
                    for item_id, quantity in lines.items()
                ),
                Decimal(0),
            )
            if not Decimal(erp.posted_amount) == posted_for.get(appt, Decimal(0)) == used:
                self.fail(
                    f"ERP {appt} posted {erp.posted_amount}, ERP got {posted_for.get(appt)}; "
                    f"the case consumed {used} worth"
                )
            for facility, lines in erp.demand.items():
                for line in lines:
                    held[("demand", facility, line.item_id, line.date)] += line.quantity
        told, held = _nonzero(told), _nonzero(held)
        if told != held:
            self.fail(f"downstream deltas {dict(told)} do not add up to {dict(held)}")

    def _orders(self) -> None:
        """(2, 3) On order is the open POs; one PO per crossing, in the actors and downstream."""
        sim = self.sim
        ordered: dict[str, list[tuple[str, int]]] = {}
        for effect_key, (_, effect) in self.emitted.items():
            if effect.name == "purchase_order":
                p = effect.payload
                entity = f"{p['item_id']}@{p['facility_id']}"
                ordered.setdefault(entity, []).append((p["po_id"], p["quantity"]))
                if effect_key not in sim.connectors["erp"].failed:
                    self.fail(f"PO {p['po_id']} was never delivered to ERP")
        # What ERP took: each PO once (a second key for the same PO would be a second order).
        took = Counter(
            self.emitted[k][1].payload["po_id"]
            for k in sim.connectors["erp"].records
            if self.emitted[k][1].name == "purchase_order"
        )
        twice = {po: n for po, n in took.items() if n > 1}
        if twice:
            self.fail(f"ERP took a PO more than once: {twice}")
        # Each facility's purchasing actor sent every PO its item actors raised, once each.
        raised = Counter[str]()
        for key in sim.entities("item"):
            item = sim.stored_state(key)
            raised[item.facility_id] += len(item.purchase_orders)
        for facility in sorted(set(raised) | {k[1] for k in sim.entities("purchasing")}):
            orders = sim.stored_state(("purchasing", facility)).orders
            if orders != raised[facility]:
                self.fail(
                    f"purchasing {facility} sent {orders} POs; its items raised {raised[facility]}"
                )
        for key in sim.entities("item"):
            item = sim.stored_state(key)
            pos = ordered.get(key[1], [])
            by_crossing = [po for po, _ in pos if po.startswith("PO:")]
            _, crossings = sim.stored_shadow.get(key, (True, 0))
            if not len(by_crossing) == item.crossings == crossings:
                self.fail(
                    f"{key[1]}: {len(by_crossing)} POs for crossings sent to ERP, the item "
                    f"counted {item.crossings} crossings, the oracle {crossings}"
                )
            if sorted(po.po_id for po in item.purchase_orders) != sorted(p for p, _ in pos):
                self.fail(f"{key[1]} holds POs {item.purchase_orders}; ERP got {pos}")
            received = Counter[str]()
            for record in sim.history.get(key, []):
                for event in record.events:
                    if isinstance(event, item_actor.Received):
                        received[event.po_id] += event.quantity
            open_quantity = sum(q - received[po] for po, q in pos)
            if item.on_order != open_quantity or any(received[po] > q for po, q in pos):
                self.fail(
                    f"{key[1]} has {item.on_order} on order; POs {pos} minus receipts "
                    f"{dict(received)} leave {open_quantity}"
                )

    def _charges(self, appointments: dict[str, Any]) -> None:
        """(4) Charges only for performed cases, each line once, in billing and per procedure."""
        sim = self.sim
        billed: dict[str, list[str]] = {}
        for _, effect in self.emitted.values():
            if effect.name in ("charge", "credit"):
                billed.setdefault(effect.payload["appointment_id"], []).append(
                    effect.payload["line_id"]
                )
        for appt, a in appointments.items():
            posted = [c.line_id for c in a.charges]
            if posted and a.status not in ("completed", "deleted"):
                self.fail(f"{appt} has charges but is {a.status}")
            billing = sim.stored_state(("billing", appt))
            if a.details is not None and a.status in ("booked", "completed"):
                want = (a.status, a.plan.readiness, a.details.payer_id)
                if (billing.status, billing.readiness, billing.payer_id) != want:
                    self.fail(f"billing {appt} was last told {billing}; the case is {want}")
            if [line.line_id for line in billing.lines] != posted:
                self.fail(f"billing {appt} holds {billing.lines}; the case posted {posted}")
            if sorted(billed.get(appt, [])) != sorted(posted):
                self.fail(f"billing system got lines {billed.get(appt)} for {appt}: {posted}")
        for key in sim.entities("procedure"):
            proc = sim.stored_state(key)
            appt, _, code = key[1].partition("#")
            a = appointments[appt]
            view = proc.view
            charges = [c for c in a.charges if c.code == code]
            codes = [p.code for p in a.details.procedures] if a.details else []
            status = a.status if code in codes else "removed"
            if (view.status, view.charges) != (status, tuple(charges)) and code in codes:
                self.fail(
                    f"procedure {key[1]} is {view.status} with {view.charges}; the case is "
                    f"{a.status} with {charges}"
                )
            if proc.performed and not any(c.type == "charge" for c in a.charges):
                self.fail(f"procedure {key[1]} is performed but {appt} posted no charge")

    def _ledgers(self) -> None:
        """Every acknowledgement arrived: nothing is pending in any sync ledger."""
        sim = self.sim
        for key in sim.stored:
            if key[0] not in LEDGER_KINDS:
                continue
            ledger = sim.stored_state(key).ledger
            if ledger.pending:
                self.fail(f"{key[0]}:{key[1]} still waits for acks: {ledger}")

    def _billing_mirrors_case(self, appointments: dict[str, Any]) -> None:
        """A closed case's pre-billing tasks are flagged for reversal after the last readiness."""
        sim = self.sim
        for appt, a in appointments.items():
            if a.status not in ("cancelled", "no_show", "deleted"):
                continue
            last = ""
            for record in sim.history.get(("billing", appt), []):
                for effect in record.effects:
                    if effect.name in ("readiness", "reversal"):
                        last = effect.name
            if last == "readiness":
                self.fail(
                    f"{appt} is {a.status}, but billing's last word was a readiness: its "
                    f"pre-billing tasks were never flagged for reversal"
                )

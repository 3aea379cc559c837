"""Faults injected into the simulated systems at run time, each with an expiry.

Pure: no clock reads.  The caller passes the current time (``time.monotonic()`` in the
server, any number in tests); a fault is over once ``now`` reaches its ``until_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

FaultMode = Literal["down", "slow", "errors"]
"""``down``: not subscribed (callers get no-responders); ``slow``: answers after a delay;
``errors``: answers every request with a transient error."""

FAULT_MODES: tuple[str, ...] = get_args(FaultMode)
SYSTEMS: tuple[str, ...] = ("billing", "erp", "supply")
DEFAULT_SLOW_DELAY_S = 2.0


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault: its mode, when it ends, and (for ``slow``) the answer delay."""

    mode: FaultMode
    until_s: float
    delay_s: float = 0.0

    def remaining_s(self, now_s: float) -> float:
        """Seconds left until the fault clears by itself (never negative)."""
        return max(0.0, self.until_s - now_s)

    def describe(self, now_s: float) -> dict[str, object]:
        """The fault as JSON-ready data, for reports and control replies."""
        out: dict[str, object] = {
            "mode": self.mode,
            "remaining_s": round(self.remaining_s(now_s), 3),
        }
        if self.mode == "slow":
            out["delay_s"] = self.delay_s
        return out


class FaultBoard:
    """The current fault of each system; at most one per system, a new one replaces the old."""

    def __init__(self) -> None:
        self._faults: dict[str, Fault] = {}

    def fail(
        self,
        system: str,
        mode: FaultMode,
        *,
        for_s: float,
        now_s: float,
        delay_s: float = DEFAULT_SLOW_DELAY_S,
    ) -> Fault:
        """Make ``system`` fail in ``mode`` for ``for_s`` seconds from ``now_s``."""
        fault = Fault(mode=mode, until_s=now_s + for_s, delay_s=delay_s if mode == "slow" else 0.0)
        self._faults[system] = fault
        return fault

    def heal(self, system: str) -> Fault | None:
        """Clear the fault of ``system`` now; returns the fault it had, if any."""
        return self._faults.pop(system, None)

    def current(self, system: str, now_s: float) -> Fault | None:
        """The fault in force at ``now_s``; an expired fault is cleared and None returned."""
        fault = self._faults.get(system)
        if fault is not None and now_s >= fault.until_s:
            del self._faults[system]
            return None
        return fault

"""What a partition worker counts: messages by outcome, and time per pipeline stage."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class WorkerStats:
    """Counters of one worker since start (a snapshot is taken with :meth:`as_dict`)."""

    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    parked: int = 0
    local: int = 0
    """Internal commands applied with their cause (counted in accepted, rejected or parked too;
    not in received: they were never read)."""
    batches: int = 0
    commit_retries: int = 0
    passivated: int = 0
    last_seq: int = 0

    def add(self, delta: WorkerStats) -> None:
        """Add the counts of a committed batch (``last_seq`` is taken, not added)."""
        for name in self.__slots__:
            if name != "last_seq":
                setattr(self, name, getattr(self, name) + getattr(delta, name))
        self.last_seq = max(self.last_seq, delta.last_seq)

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class StageTimes:
    """Where a worker's batches spend their time, per pipeline stage (seconds since start, and
    the slowest batch), for ``caresync health`` and the benchmarks."""

    totals: dict[str, float] = field(default_factory=dict)
    slowest: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        """One batch spent ``seconds`` in ``stage``."""
        self.totals[stage] = self.totals.get(stage, 0.0) + seconds
        self.slowest[stage] = max(self.slowest.get(stage, 0.0), seconds)
        self.counts[stage] = self.counts.get(stage, 0) + 1

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Per stage: batches, total and mean milliseconds, the slowest batch."""
        return {
            stage: {
                "batches": self.counts[stage],
                "total_ms": round(total * 1000, 1),
                "mean_ms": round(total * 1000 / self.counts[stage], 3),
                "max_ms": round(self.slowest[stage] * 1000, 3),
            }
            for stage, total in self.totals.items()
        }

"""The knobs of one partition worker, from the validated configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from caresync.config import Config
from caresync.router.actor import Supervision


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The knobs of one partition worker (from ``[router]``, ``[supervision]``, ``[outbox]``)."""

    batch_size: int = 2000
    """At most this many messages per batch (fewer when fewer are waiting).  bench fanout with
    2 processes, 3 interleaved pairs each: 500 -> 6,015 / 5,980 / 6,023 commands/s against
    1000 -> 6,338 / 6,505 / 6,436; 1000 -> 6,270 / 6,317 / 6,490 against 2000 -> 6,463 /
    6,558 / 6,796.  A batch's entity, dedupe and outbox rows share more SQLite pages, and the
    per-batch costs are spread over more commands.  Paced at 50 % of peak the batches are small
    either way: bench latency p99 13.1 / 13.0 ms with 500, 15.6 / 18.0 with 2000."""
    batch_max_commands: int = 4000
    """About how many commands (inputs and the local commands they bring) a batch applies at
    most: the next batch takes ``batch_size`` scaled by the last one's fan-out.  1M bookings
    (7 local commands each) with batches of 2000 inputs left a router idle at 562 MB resident
    (332 MB with 500): three batches of ~16,000 applied commands are alive at once."""
    pull_timeout_s: float = 1.0
    batches_in_flight: int = 1
    """Batches in the pull stage's hands: 1 pulls each batch when the apply stage asks for it,
    so that it holds every message that arrived until then; each one more is pulled ahead and
    makes a message wait for one more apply.  bench latency p99 at 50 % of peak, 3
    interleaved runs each: a batch queued ahead and another forming 32.9 / 32.3 / 29.2 ms, one
    forming during the apply 23.5 / 24.9 / 22.4, pulled when asked 16.4 / 16.6 / 14.5."""
    max_live_actors: int = 10_000
    idle_passivate_s: float = 60.0
    supervision: Supervision = field(default_factory=Supervision)
    commit_retry_initial_s: float = 0.05
    commit_retry_max_s: float = 5.0

    @classmethod
    def from_config(cls, cfg: Config) -> WorkerSettings:
        """Settings from a validated configuration."""
        return cls(
            batch_size=cfg.router.batch_size,
            batch_max_commands=cfg.router.batch_max_commands,
            pull_timeout_s=cfg.router.pull_expires_ms / 1000,
            batches_in_flight=cfg.router.batches_in_flight,
            max_live_actors=cfg.router.max_live_actors,
            idle_passivate_s=cfg.router.idle_passivate_s,
            supervision=Supervision(
                max_failures=cfg.supervision.max_failures,
                backoff_initial_s=cfg.supervision.backoff_initial_ms / 1000,
                backoff_max_s=cfg.supervision.backoff_max_ms / 1000,
            ),
        )

"""The knobs of one partition worker, from the validated configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from caresync.config import Config
from caresync.router.actor import Supervision


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The knobs of one partition worker (from ``[router]``, ``[supervision]``, ``[outbox]``)."""

    batch_size: int = 500
    pull_timeout_s: float = 1.0
    batches_in_flight: int = 1
    """Batches pulled before the apply stage takes them.  One more queued batch made every
    message wait for one more apply: bench latency p99 at 50 % of peak 32.9 / 32.3 / 29.2 ms
    with 2 against 23.5 / 24.9 / 22.4 with 1 (interleaved), and fanout with 2 processes
    5,882 / 5,870 against 6,074 / 6,116 commands/s."""
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

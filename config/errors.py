"""Errors raised by ``caresync.config``.

Exception tree::

    Exception
     └── ConfigError   configuration cannot be loaded or is invalid
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """The configuration cannot be loaded or is invalid.

    ``source`` is the file path or environment variable name the bad value came
    from, ``key`` the dotted key (``""`` when not applicable) and ``problem`` a
    human-readable description.
    """

    source: str
    key: str
    problem: str

    def __init__(self, source: str, key: str, problem: str) -> None:
        # Positional args keep the exception picklable (it is rebuilt from args).
        super().__init__(source, key, problem)
        self.source = source
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        if self.key:
            return f"{self.source}: {self.key}: {self.problem}"
        return f"{self.source}: {self.problem}"

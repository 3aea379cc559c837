"""The ``caresync`` command line (``caresync --help``)."""

from __future__ import annotations

from caresync.cli.main import main

__all__ = ["main"]

"""Errors of the sweep (importable without Optuna, so the CLI can catch them cheaply)."""

from __future__ import annotations


class SweepFailed(RuntimeError):
    """The sweep stopped because its trials keep failing (``sweep.max_failures``); the message says why."""

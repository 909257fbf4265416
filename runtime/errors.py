"""The error every layer of the runtime raises for the user: the bottom of the runtime's imports.

A :class:`JobError` carries a message meant for the user as is; ``runtime.jobs.common.run_job``
prints it as one line (no exception type prefix) and exits 1. Modules below the jobs
(``runtime.devices``, ``runtime.preflight``) raise it without importing the jobs layer.
Standard library only: the compiler imports ``runtime.preflight``, which imports this.
"""

from __future__ import annotations

__all__ = ["JobError"]


class JobError(RuntimeError):
    """A failure with a message meant for the user as is (no exception type prefix)."""

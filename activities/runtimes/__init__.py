"""Runtime drivers: one per runtime kind, behind :class:`RuntimeDriver`.

Adding a kind means adding a driver and registering it in :func:`driver_for`; no
workflow changes, because workflows only ask "deploy this snapshot to that runtime".
"""

from __future__ import annotations

from activities.runtimes.base import RuntimeDriver, driver_for

__all__ = ["RuntimeDriver", "driver_for"]

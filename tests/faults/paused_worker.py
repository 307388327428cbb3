"""``mlc worker`` with one activity held, so a fault test can ``kill -9`` it at that point.

Run as ``python -m tests.faults.paused_worker``, with the ``mlc worker`` environment plus:

- ``MLC_FAULT_ACTIVITY``: the activity to hold (e.g. ``deploy_online``);
- ``MLC_FAULT_WHEN``: ``before`` (hold before the real work: nothing of it happened yet)
  or ``after`` (the real work is done, its result not yet reported);
- ``MLC_FAULT_MARKER``: a file written when the hold begins (the test waits for it);
- ``MLC_FAULT_SECONDS``: how long to hold (default: an hour, i.e. until killed).

Everything else is the real worker: the wrapper is applied to the activity list the
real ``mlc worker`` command builds, whatever it contains.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.worker import Worker


def _held(original: Callable[..., Any], *, when: str, marker: Path, seconds: float) -> Callable[..., Any]:
    defn = activity._Definition.must_from_callable(original)

    async def hold() -> None:
        marker.write_text(json.dumps({"pid": os.getpid(), "activity": defn.name, "when": when}))
        await asyncio.sleep(seconds)

    async def wrapper(*args: Any) -> Any:
        if when == "before":
            await hold()
        result = await original(*args)
        if when == "after":
            await hold()
        return result

    wrapper.__temporal_activity_definition = dataclasses.replace(defn, fn=wrapper)  # type: ignore[attr-defined]
    return wrapper


def _install() -> None:
    target = os.environ["MLC_FAULT_ACTIVITY"]
    when = os.environ.get("MLC_FAULT_WHEN", "before")
    marker = Path(os.environ["MLC_FAULT_MARKER"])
    seconds = float(os.environ.get("MLC_FAULT_SECONDS", "3600"))
    real_init = Worker.__init__

    def init(self: Worker, *args: Any, **kwargs: Any) -> None:
        kwargs["activities"] = [
            _held(fn, when=when, marker=marker, seconds=seconds)
            if activity._Definition.must_from_callable(fn).name == target
            else fn
            for fn in kwargs.get("activities") or []
        ]
        real_init(self, *args, **kwargs)

    Worker.__init__ = init  # type: ignore[method-assign]


if __name__ == "__main__":
    _install()
    from cli import main

    sys.argv = ["mlc", "worker", *sys.argv[1:]]
    main()

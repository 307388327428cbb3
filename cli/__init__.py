"""The ``mlc`` command line: thin commands over the Temporal client and the inventory."""

from __future__ import annotations

from cli.app import main

__all__ = ["main"]

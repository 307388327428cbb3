"""The ``mlc`` command line: thin commands over the Temporal client and the inventory.

The top layer: it imports the core, workers and activities, and nothing imports it (see
``docs/architecture.md``). ``cli.stack`` is the embedded stack ``mlc dev`` runs.
"""

from __future__ import annotations

from cli.app import main

__all__ = ["main"]

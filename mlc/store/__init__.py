"""The PostgreSQL inventory: connection, migrations and one module per resource.

Only activities and the CLI use it; workflows reach it through activities.
"""

from __future__ import annotations

from mlc.store.db import connect, migrate

__all__ = ["connect", "migrate"]

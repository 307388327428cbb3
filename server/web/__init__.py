"""The web page of ``mlc server``: read-only HTML views over the inventory (design §7).

Plain Starlette routes outside ``/v1``, rendered with Jinja2 and readable without
JavaScript; the vendored htmx only refreshes fragments (a run's status while it waits).
Nothing here changes the inventory: a person decides with ``mlc approve``, whose exact
command the run page shows (design §4, docs/api.md "Web page").
"""

from __future__ import annotations

from server.web.routes import routes

__all__ = ["routes"]

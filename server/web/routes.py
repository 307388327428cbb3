"""The page routes, mounted by ``server.app.create_app`` beside ``/v1``."""

from __future__ import annotations

from pathlib import Path

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from server.web import audit, history, inventory, run, session, waiting

STATIC = Path(__file__).parent.parent / "static"


def routes() -> list[BaseRoute]:
    """Every page (GET only: no page changes state) and the vendored static files."""
    return [
        Route("/", inventory.inventory, methods=["GET"]),
        Route("/runs/{model}/{version}", run.run_page, methods=["GET"]),
        Route("/waiting", waiting.waiting, methods=["GET"]),
        Route("/history/{model}", history.history, methods=["GET"]),
        Route("/audit", audit.audit, methods=["GET"]),
        Route("/session", session.explain, methods=["GET"]),
        Route("/session/{token}", session.open_session, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]

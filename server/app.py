"""The Starlette application: the declared endpoints, the OpenAPI document, health."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlc.store import connect
from server import openapi
from server.api import ENDPOINTS, route
from server.auth.nonces import sweep_nonces
from server.auth.oidc import OidcVerifier
from server.config import ServerConfig
from server.context import ServerContext
from server.routes import MODULES
from server.web import routes as web_routes
from server.web.login import OidcLogin

OPENAPI_PATH = "/v1/openapi.json"
POOL_SIZE = 10


def _version() -> str:
    try:
        return metadata.version("mlc-orchestrator")
    except metadata.PackageNotFoundError:
        return "unknown"


def create_app(config: ServerConfig, *, oidc: OidcVerifier | None = None) -> Starlette:
    """The server for ``config``; the pool opens when the app starts and closes when it stops.
    ``oidc`` checks bearer tokens (made after discovery, before the server starts); without it
    tokens are refused. With its client secret it also signs browsers in (``/login``)."""
    assert MODULES and config.settings.database_url
    login = OidcLogin(oidc, config.public_url) if oidc is not None and OidcLogin.available(oidc) else None
    document = openapi.document(_version())

    async def schema(request: Request) -> Response:
        return JSONResponse(document)

    async def health(request: Request) -> Response:
        await request.app.state.ctx.pool.fetchval("SELECT 1")
        return JSONResponse({"ok": True})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        assert config.settings.database_url
        pool = await connect(config.settings.database_url, max_size=POOL_SIZE)
        app.state.ctx = ServerContext(config, pool, oidc=oidc)
        sweeper = asyncio.create_task(sweep_nonces(pool), name="sweep api_nonces")
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await pool.close()

    routes = [
        Route(OPENAPI_PATH, schema, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        *(route(spec) for spec in ENDPOINTS),
        *web_routes(),
        *(login.routes() if login else []),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.oidc_login = login is not None
    return app

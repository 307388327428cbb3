"""One way to declare an endpoint: its route, the role it needs, its body and answer types.

Every endpoint goes through the same wrapper (authenticate, check the role, read a bounded
body, turn core errors into answers), and the OpenAPI schema is built from the same
declarations, so the documentation cannot drift from what is enforced.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.auth import authenticate
from server.context import ServerContext
from server.errors import ApiError, from_exception
from server.limits import read_body
from server.principal import Principal, Role

log = logging.getLogger(__name__)

JSON_BODY_LIMIT = 64 * 1024
"""Largest JSON body (signed statements are under 4 KiB)."""
MAX_PAGE = 500
DEFAULT_PAGE = 50

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list; ``next`` is the ``after`` cursor of the following page, if any."""

    items: list[T]
    next: str | None = None


@dataclass
class Call:
    """One authenticated request as a handler sees it."""

    request: Request
    principal: Principal
    ctx: ServerContext
    body: Any = None

    def path(self, name: str) -> str:
        return str(self.request.path_params[name])

    def query(self, name: str, default: str | None = None) -> str | None:
        return self.request.query_params.get(name, default)

    def limit(self) -> int:
        """The page size asked for (``?limit=``), bounded."""
        raw = self.query("limit") or str(DEFAULT_PAGE)
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
            raise ApiError(422, f"limit must be a whole number from 1 to {MAX_PAGE}", "invalid")
        return int(raw)


Handler = Callable[[Call], Awaitable[BaseModel | Response]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    role: Role
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None
    response: Any = None
    streamed: bool = False
    """The handler reads the body itself (uploads): the wrapper checks no digest."""
    params: tuple[str, ...] = field(default=())
    limit: int = JSON_BODY_LIMIT
    """Largest JSON body this endpoint reads (lifecycle sources need more than a statement)."""
    status: int = 200
    """The success status it answers with (the schema says so; 202 for work that continues)."""


ENDPOINTS: list[Endpoint] = []


def endpoint(
    method: str,
    path: str,
    *,
    role: Role,
    summary: str,
    body: type[BaseModel] | None = None,
    response: Any = None,
    streamed: bool = False,
    params: tuple[str, ...] = (),
    limit: int = JSON_BODY_LIMIT,
    status: int = 200,
) -> Callable[[Handler], Handler]:
    """Declare ``handler`` as the answer to ``method path`` for principals with ``role`` or more."""

    def register(handler: Handler) -> Handler:
        ENDPOINTS.append(
            Endpoint(method, path, role, handler, summary, body, response, streamed, params, limit, status)
        )
        return handler

    return register


def error_response(error: ApiError) -> JSONResponse:
    headers = dict(error.headers)
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Signature, Bearer realm="mlc"'
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _caller(request: Request, ctx: ServerContext, raw: bytes | None) -> Principal:
    """Authenticate within the rate limits: a client address that keeps failing is slowed
    down before its next attempt is even checked; a principal pays a read or write token."""
    address = request.client.host if request.client else "unknown"
    ctx.limits.before_authentication(address)
    try:
        principal = await authenticate(request, ctx, raw)
    except ApiError as exc:
        if exc.status == 401:
            ctx.limits.authentication_failed(address)
        raise
    ctx.limits.charge(principal.name, request.method)
    return principal


def route(spec: Endpoint) -> Route:
    """The Starlette route running ``spec`` behind authentication and error mapping."""

    async def run(request: Request) -> Response:
        ctx: ServerContext = request.app.state.ctx
        try:
            raw = None if spec.streamed else await read_body(request, spec.limit)
            principal = await _caller(request, ctx, raw)
            if principal.role < spec.role:
                raise ApiError(
                    403, f"{principal.name} is {principal.role.label}; this needs {spec.role.label}", "role"
                )
            call = Call(request, principal, ctx)
            if spec.body is not None:
                if not raw:
                    raise ApiError(422, "this endpoint needs a JSON body", "invalid")
                call.body = spec.body.model_validate_json(raw)
            answer = await spec.handler(call)
        except Exception as exc:  # every error becomes an answer; unexpected ones are logged
            mapped = from_exception(exc)
            if mapped is None:
                log.exception("%s %s failed", request.method, spec.path)
                mapped = ApiError(500, "internal error (logged on the server)", "internal")
            return error_response(mapped)
        if isinstance(answer, Response):
            return answer
        return Response(answer.model_dump_json(), status_code=spec.status, media_type="application/json")

    return Route(spec.path, run, methods=[spec.method], name=f"{spec.method} {spec.path}")

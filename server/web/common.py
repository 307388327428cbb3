"""What every page shares: the templates, the session check, rendering whole pages or the
fragment htmx asked for, and the headers that keep the page read-only and script-tight."""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from mlc.errors import NotFoundError
from server.auth import sessions
from server.context import ServerContext
from server.errors import ApiError
from server.principal import Principal, Role

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent.parent / "templates"))
"""Autoescaping is on for ``.html``: names, comments and summaries from the trail are text."""

PAGE_SIZE = 50
"""Rows per page of every listing (snapshots, runs, trail entries)."""

SECURITY_HEADERS = {
    # Only our own script (htmx and page.js) runs; no inline script, no eval, no framing.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
"""``htmx`` injects its indicator style inline, hence ``style-src 'unsafe-inline'``."""


class View(BaseModel):
    """Base of the pages' view models: built from the store, read by templates, never input."""

    model_config = ConfigDict(frozen=True, extra="forbid")


PageHandler = Callable[[Request, ServerContext, Principal], Awaitable[Response]]


def page(handler: PageHandler) -> Callable[[Request], Awaitable[Response]]:
    """A page route: only for a browser session (``mlc login --web``); without one, the
    page that explains how to get one (htmx polls are told to go there too)."""

    async def endpoint(request: Request) -> Response:
        ctx: ServerContext = request.app.state.ctx
        try:
            principal = await sessions.authenticate(request, ctx)
        except ApiError:
            if request.headers.get("HX-Request"):
                return Response(status_code=204, headers={"HX-Redirect": "/session"})
            return RedirectResponse("/session", status_code=303)
        try:
            response = await handler(request, ctx, principal)
        except ApiError as exc:
            return render(request, "error.html", principal, status_code=exc.status, message=exc.error)
        except NotFoundError as exc:
            return render(request, "error.html", principal, status_code=404, message=str(exc))
        response.headers.update(SECURITY_HEADERS)
        return response

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


def render(
    request: Request,
    template: str,
    principal: Principal | None,
    *,
    fragment: str | None = None,
    status_code: int = 200,
    **context: Any,
) -> Response:
    """Render ``template`` as a whole page, or only ``fragment`` when htmx asks for it
    (its ``HX-Request`` header): one handler per page serves both."""
    name = fragment if fragment is not None and request.headers.get("HX-Request") else template
    response = TEMPLATES.TemplateResponse(
        request,
        name,
        {"principal": principal, **context},
        status_code=status_code,
    )
    response.headers.update(SECURITY_HEADERS)
    return response


def may_decide(principal: Principal) -> bool:
    """Read-only principals see no commands: deciding needs at least the member role."""
    return principal.role >= Role.MEMBER


def command(*words: str) -> str:
    """A shell command line, each word quoted where the shell would read it otherwise."""
    return " ".join(shlex.quote(w) for w in words)


def int_param(request: Request, name: str) -> int | None:
    """A positive integer query parameter (a page cursor), or None when absent.

    Raises:
        ApiError: it is there but not a positive integer (400).
    """
    text = request.query_params.get(name)
    if text is None or text == "":
        return None
    if not text.isdigit() or len(text) > 18 or int(text) < 1:
        raise ApiError(400, f"{name} must be a positive integer, not {text[:40]!r}", reason="bad-parameter")
    return int(text)

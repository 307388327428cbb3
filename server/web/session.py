"""Signing in to the web page: the page that explains ``mlc login --web`` (where every page
sends a browser without a session), and the single-use link that sets the cookie."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from server.auth import sessions
from server.context import ServerContext
from server.web.common import render


async def explain(request: Request) -> Response:
    """``GET /session``: how to get a browser session (no session needed to read it)."""
    return render(request, "session.html", None, used_link=False, oidc_login=request.app.state.oidc_login)


async def open_session(request: Request) -> Response:
    """``GET /session/{token}``: use a link once; the cookie goes with a redirect to ``/``.

    The only state this changes is the link (used) and the new session: nothing a page
    shows, decides or deploys.
    """
    ctx: ServerContext = request.app.state.ctx
    response = RedirectResponse("/", status_code=303)
    principal = await sessions.redeem_link(ctx, str(request.path_params["token"]), response)
    if principal is None:
        login = request.app.state.oidc_login
        return render(request, "session.html", None, used_link=True, oidc_login=login, status_code=400)
    return response

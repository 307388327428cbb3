"""Signing in to the web page through the identity provider (design §3.3).

The server is the provider's confidential client: ``/login`` sends the browser to the
provider (authorization-code flow with ``state``, ``nonce`` and PKCE, all three kept in a
short-lived cookie), ``/login/callback`` exchanges the code with our client secret, checks the
ID token exactly as a bearer token is checked, and opens the same browser session
``mlc login --web`` does, with the role the token's groups map to.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from urllib.parse import urlencode

import anyio.to_thread
import httpx
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from server.auth import sessions
from server.auth.oidc import OidcVerifier
from server.context import ServerContext
from server.errors import ApiError
from server.principal import Principal
from server.web.common import render

LOGIN_COOKIE = "mlc_login"
CALLBACK_PATH = "/login/callback"
LOGIN_SECONDS = 600
"""How long a started sign-in may take at the provider."""
SCOPES = "openid profile"
EXCHANGE_TIMEOUT = 10.0


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class OidcLogin:
    """``/login`` and ``/login/callback`` for one provider; only mounted when the provider
    has a browser sign-in and ``MLC_OIDC_CLIENT_SECRET`` is set."""

    def __init__(self, verifier: OidcVerifier, public_url: str) -> None:
        discovery, config = verifier.discovery, verifier.config
        assert discovery.authorization_endpoint and discovery.token_endpoint and config.client_secret
        self.verifier = verifier
        self.authorization_endpoint = discovery.authorization_endpoint
        self.token_endpoint = discovery.token_endpoint
        self.client_id = config.audience
        self._secret = config.client_secret
        self.public_url = public_url.rstrip("/")
        self.redirect_uri = self.public_url + CALLBACK_PATH

    @staticmethod
    def available(verifier: OidcVerifier) -> bool:
        """Whether ``verifier``'s provider can sign browsers in for us."""
        return bool(
            verifier.config.client_secret
            and verifier.discovery.authorization_endpoint
            and verifier.discovery.token_endpoint
        )

    def routes(self) -> list[Route]:
        return [
            Route("/login", self.start, methods=["GET"]),
            Route(CALLBACK_PATH, self.callback, methods=["GET"]),
        ]

    async def start(self, request: Request) -> Response:
        """``GET /login``: off to the provider, with fresh state, nonce and PKCE verifier."""
        state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
        query = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": SCOPES,
            "state": state,
            "nonce": nonce,
            "code_challenge": _challenge(verifier),
            "code_challenge_method": "S256",
        }
        separator = "&" if "?" in self.authorization_endpoint else "?"
        response = RedirectResponse(
            self.authorization_endpoint + separator + urlencode(query), status_code=302
        )
        # Lax, not Strict: the provider's redirect back to us is a cross-site navigation.
        response.set_cookie(
            LOGIN_COOKIE,
            f"{state}.{nonce}.{verifier}",
            max_age=LOGIN_SECONDS,
            path=CALLBACK_PATH,
            secure=sessions.secure_cookie(self.public_url),
            httponly=True,
            samesite="lax",
        )
        return response

    async def callback(self, request: Request) -> Response:
        """``GET /login/callback``: the provider's answer becomes a browser session."""
        ctx: ServerContext = request.app.state.ctx
        try:
            principal = await self._signed_in(request)
        except ApiError as exc:
            response = render(request, "error.html", None, status_code=exc.status, message=exc.error)
            response.delete_cookie(LOGIN_COOKIE, path=CALLBACK_PATH)
            return response
        link, _ = await sessions.create_link(ctx, principal)
        # A page that moves on by itself rather than a redirect: a redirect chain that began
        # at the provider is cross-site, and the browser would withhold the Strict session
        # cookie from the first page.
        response = render(request, "signed_in.html", principal)
        response.headers["Refresh"] = "0; url=/"
        opened = await sessions.redeem_link(ctx, link.rsplit("/", 1)[-1], response)
        assert opened is not None, "a link made a moment ago opens"
        response.delete_cookie(LOGIN_COOKIE, path=CALLBACK_PATH)
        return response

    async def _signed_in(self, request: Request) -> Principal:
        params = request.query_params
        if "error" in params:
            problem = params["error"][:80]
            raise ApiError(401, f"the identity provider did not sign you in ({problem})", "login-refused")
        parts = request.cookies.get(LOGIN_COOKIE, "").split(".")
        state, code = params.get("state", ""), params.get("code", "")
        if len(parts) != 3 or not code or not _same(parts[0], state):
            raise ApiError(
                400,
                "this sign-in was not started from this browser, or took longer than 10 minutes: "
                "open /login again",
                "login-state",
            )
        _, nonce, verifier = parts
        try:
            async with httpx.AsyncClient(timeout=EXCHANGE_TIMEOUT, follow_redirects=False) as http:
                answer = await http.post(
                    self.token_endpoint,
                    data={
                        "grant_type": "authorization_code",
                        "code": code,
                        "redirect_uri": self.redirect_uri,
                        "code_verifier": verifier,
                    },
                    auth=(self.client_id, self._secret),
                )
        except httpx.HTTPError:
            raise ApiError(
                502, "the identity provider cannot be reached: try again", "login-failed"
            ) from None
        try:
            token = answer.json().get("id_token") if answer.status_code == 200 else None
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str):
            raise ApiError(
                502,
                f"the identity provider did not exchange the code (HTTP {answer.status_code})",
                "login-failed",
            )
        claims = await anyio.to_thread.run_sync(self.verifier.verify, token)
        if not _same(str(claims.get("nonce", "")), nonce):
            raise ApiError(401, "the ID token was not issued for this sign-in (nonce)", "bad-token")
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.client_id:
            # OIDC Core 3.1.3.7: a token for several audiences must name us as its party.
            raise ApiError(401, "the ID token was issued to another client (azp)", "bad-token")
        return self.verifier.principal(claims)

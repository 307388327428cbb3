"""A real OIDC provider for tests: ``oidc-provider-mock`` as its own process on 127.0.0.1.

Tokens come through the authorization-code flow as a browser would get them (authorize
with a ``sub``, exchange the code). Each start makes a new RSA key, so restarting on the
same port is a key rotation at the same issuer URL.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import urllib.parse
from typing import Any

import httpx
import jwt

CLIENT_ID = "mlc-api"
"""The audience our server is configured with in tests (the provider accepts any client id)."""
REDIRECT_URI = "http://127.0.0.1:1/callback"
"""Never followed: the code is read off the authorize response's ``Location``."""
START_TIMEOUT = 30.0


def free_port() -> int:
    """A port nobody listens on right now (the provider binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class OidcProvider:
    """One ``python -m oidc_provider_mock`` process; ``restart`` keeps port and issuer."""

    def __init__(self, *, port: int | None = None, token_max_age: int | None = None) -> None:
        self.port = port or free_port()
        self.token_max_age = token_max_age
        self.process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def issuer(self) -> str:
        """The issuer URL, as the provider writes it in discovery and in every token."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start the process and return once uvicorn says it is listening."""
        args = [sys.executable, "-W", "ignore", "-m", "oidc_provider_mock", "-p", str(self.port)]
        if self.token_max_age is not None:
            args += ["-e", str(self.token_max_age)]
        env = {"NO_COLOR": "1", "PATH": "/usr/bin:/bin"}
        self.process = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env
        )
        assert self.process.stderr is not None
        seen: list[str] = []

        async def listening() -> None:
            assert self.process is not None and self.process.stderr is not None
            while line := (await self.process.stderr.readline()).decode(errors="replace"):
                seen.append(line)
                if "Uvicorn running on" in line:
                    return
            raise RuntimeError("oidc_provider_mock exited:\n" + "".join(seen[-20:]))

        try:
            await asyncio.wait_for(listening(), START_TIMEOUT)
        except BaseException:
            await self.stop()
            raise
        # Keep draining stderr so the provider never blocks on a full pipe.
        self._drain = asyncio.create_task(self._discard(self.process.stderr))

    @staticmethod
    async def _discard(stream: asyncio.StreamReader) -> None:
        while await stream.read(65536):
            pass

    async def stop(self) -> None:
        """Stop the process and wait for it (its port is free afterwards)."""
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        if self._drain is not None:
            await self._drain  # ends at the closed pipe's EOF
        self.process, self._drain = None, None

    async def restart(self) -> None:
        """Stop and start on the same port: a new signing key (and kid) at the same issuer."""
        await self.stop()
        await self.start()

    @staticmethod
    def kid(token: str) -> str:
        """The key id in ``token``'s header."""
        kid: str = jwt.get_unverified_header(token)["kid"]
        return kid

    async def set_user(
        self, sub: str, *, groups: list[str] | None = None, username: str | None = None, **extra: Any
    ) -> None:
        """Set the claims the provider puts in ``sub``'s ID tokens."""
        claims: dict[str, Any] = {"preferred_username": username or sub, **extra}
        if groups is not None:
            claims["groups"] = groups
        async with httpx.AsyncClient(base_url=self.issuer, timeout=10) as http:
            (await http.put(f"/users/{urllib.parse.quote(sub, safe='')}", json=claims)).raise_for_status()

    async def token(
        self,
        sub: str,
        *,
        groups: list[str] | None = None,
        username: str | None = None,
        client_id: str = CLIENT_ID,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """An ID token for ``sub`` with the given claims, via the authorization-code flow."""
        await self.set_user(sub, groups=groups, username=username, **(extra or {}))
        query = {
            "client_id": client_id,
            "redirect_uri": REDIRECT_URI,
            "response_type": "code",
            "scope": "openid profile",
            "state": "s",
        }
        async with httpx.AsyncClient(base_url=self.issuer, timeout=10) as http:
            authorized = await http.post(
                "/oauth2/authorize?" + urllib.parse.urlencode(query), data={"sub": sub}
            )
            location = urllib.parse.urlparse(authorized.headers["location"])
            code = urllib.parse.parse_qs(location.query)["code"][0]
            response = await http.post(
                "/oauth2/token",
                data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
                auth=(client_id, "any-secret"),
            )
            response.raise_for_status()
        token: str = response.json()["id_token"]
        # Our unknown-kid and rotation cases depend on it: authlib >= 1.7 under this mock
        # drops the kid (design §11); fail loudly if a dependency bump brings that back.
        assert jwt.get_unverified_header(token).get("kid"), "the provider issued an ID token without a kid"
        return token

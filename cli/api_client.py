"""The CLI's way to the control plane: every request signed with the user's ``mlc`` key.

With ``MLC_API_URL`` set the CLI talks only to ``mlc server``: it holds no database DSN and
no Temporal address, and the key that signs a decision also authenticates the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Self

import httpx

from mlc.errors import (
    ConflictError,
    InvalidPackageError,
    MLCError,
    NotFoundError,
    PermissionDeniedError,
    RefusedError,
    RuntimeUnavailableError,
)
from mlc.trust.requests import sign_request

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

TIMEOUT = httpx.Timeout(30.0, connect=5.0)
_ERRORS: dict[int, type[MLCError]] = {
    401: RefusedError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: InvalidPackageError,
    422: InvalidPackageError,
    429: RuntimeUnavailableError,
    503: RuntimeUnavailableError,
}


class ApiClient:
    """Signed JSON calls to one ``mlc server``; errors become the CLI's own exceptions."""

    def __init__(self, base_url: str, key: Ed25519PrivateKey) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self._http = httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Sign and send ``request``; a refusal raises with the server's message (``stream``:
        the body of a success is read by the caller, who closes the response)."""
        sign_request(request, self.key)
        try:
            response = await self._http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise RuntimeUnavailableError(f"cannot reach the mlc server at {self.base_url}: {exc}") from exc
        if response.is_success:
            return response
        if stream:
            await response.aread()
            await response.aclose()
        try:
            problem = response.json()
            message = f"{problem['error']} ({problem.get('reason') or response.status_code})"
        except (ValueError, KeyError, TypeError):
            message = f"the mlc server answered {response.status_code}"
        raise _ERRORS.get(response.status_code, MLCError)(message)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Request:
        return self._http.build_request(method, f"{self.base_url}{path}", **kwargs)

    async def get(self, path: str, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        return (await self.send(self.request("GET", path, params=query))).json()

    async def post(self, path: str, body: Any) -> Any:
        return (await self.send(self.request("POST", path, json=body))).json()

    async def put(self, path: str, content: bytes, headers: dict[str, str]) -> Any:
        """Upload ``content`` as a raw body; ``headers`` carry its ``Content-Digest``, which the
        signature covers (the server hashes the stream against it)."""
        return (await self.send(self.request("PUT", path, content=content, headers=headers))).json()

    async def stream(self, path: str, **params: Any) -> AsyncIterator[bytes]:
        """The body of a ``GET`` as it arrives (exports), never held whole."""
        query = {k: v for k, v in params.items() if v is not None}
        response = await self.send(self.request("GET", path, params=query), stream=True)
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as exc:
            raise RuntimeUnavailableError(f"the mlc server's answer broke off: {exc}") from exc
        finally:
            await response.aclose()

    async def pages(self, path: str, **params: Any) -> AsyncIterator[Any]:
        """Every item of a paged list, following ``next`` cursors."""
        after = None
        while True:
            page = await self.get(path, **params, after=after, limit=500)
            for item in page["items"]:
                yield item
            after = page.get("next")
            if not after:
                return

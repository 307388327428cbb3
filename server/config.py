"""What ``mlc server`` needs to know, read once at start."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mlc.config import Settings
from mlc.errors import PrerequisiteError
from server.oidc_config import OidcConfig

DEFAULT_PORT = 8280
DEFAULT_TEMPORAL_UI = "http://127.0.0.1:8233"
"""The Temporal Web UI of ``mlc dev`` (the run page links each run there)."""


@dataclass(frozen=True)
class ServerConfig:
    """The server's settings: the inventory owner's DSN lives only here and on workers."""

    settings: Settings
    public_url: str
    """The URL clients sign requests for (``MLC_API_PUBLIC_URL``): the server rebuilds each
    request's ``@target-uri`` from it, never from the ``Host`` header, so a request signed for
    another server or behind another proxy path does not verify here."""
    temporal_ui_url: str = DEFAULT_TEMPORAL_UI
    """The Temporal Web UI people open (``MLC_TEMPORAL_UI_URL``): the run page links there."""
    oidc: OidcConfig | None = None
    """The identity provider whose ID tokens are accepted as bearer tokens (``MLC_OIDC_*``);
    None: only signed requests and sessions."""

    @classmethod
    def from_env(cls, settings: Settings, *, host: str, port: int) -> ServerConfig:
        if not settings.database_url:
            raise PrerequisiteError(
                "`mlc server` needs the inventory owner's DSN in MLC_DATABASE_URL "
                "(it is the only process besides the workers that holds it)"
            )
        public = os.environ.get("MLC_API_PUBLIC_URL") or f"http://{_url_host(host)}:{port}"
        ui = os.environ.get("MLC_TEMPORAL_UI_URL") or DEFAULT_TEMPORAL_UI
        return cls(
            settings=settings,
            public_url=public.rstrip("/"),
            temporal_ui_url=ui.rstrip("/"),
            oidc=OidcConfig.from_env(),
        )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

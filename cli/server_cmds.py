"""``mlc server``: run the control plane's HTTP API and web page on this host."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.context import api, console, run, settings
from cli.logs import service_logging


def register(app: typer.Typer) -> None:
    """Attach this command to the root app."""
    app.command("server")(server)
    app.command("login")(login)


def server(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8280,
    port_file: Annotated[
        Path | None, typer.Option(help="Write the bound port here once serving (for --port 0).")
    ] = None,
) -> None:
    """Serve the HTTP API (/v1, schema at /v1/openapi.json) and the web page.

    Needs the inventory owner's DSN (MLC_DATABASE_URL) and Temporal (TEMPORAL_ADDRESS):
    people then need only the URL and their key (MLC_API_URL, MLC_SIGNING_KEY) or an OIDC
    token. Clients sign for MLC_API_PUBLIC_URL (default http://HOST:PORT): set it to the URL
    people use when a proxy sits in front.
    """
    from server.main import serve

    service_logging()
    run(serve(settings(), host=host, port=port, port_file=port_file))


def login(
    web: Annotated[
        bool, typer.Option("--web", help="Print a single-use link (60 s) that opens the web page.")
    ] = False,
) -> None:
    """Open the web page of the mlc server at MLC_API_URL: a link signed for with your key.

    The link works once, within a minute, and gives the browser an 8-hour session as you
    (with your API role). The page only reads; decisions stay `mlc approve` commands.
    """
    if not web:
        raise typer.BadParameter("say what to log in to: `mlc login --web` (the web page)")

    async def go() -> dict[str, str]:
        client = api(settings())
        if client is None:
            raise typer.BadParameter(
                "`mlc login --web` asks the mlc server for the link: set MLC_API_URL to its address "
                "(`mlc dev` prints it)"
            )
        async with client:
            answer: dict[str, str] = await client.post("/v1/web-sessions", {})
            return answer

    link = run(go())
    console.print(
        f"open within a minute (works once; an 8-hour session as {link['principal']}, {link['role']}):",
        highlight=False,
    )
    print(link["url"])

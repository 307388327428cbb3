"""The docker gateway: both nginx tiers as containers on the runtime's engine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

import docker.errors

from activities.runtimes.base import Heartbeat
from activities.runtimes.docker.containers import sockets_root
from activities.runtimes.docker.engine import connect, docker_settings, run_with_heartbeats
from activities.runtimes.gateway.image import ensure_gateway_image
from activities.runtimes.gateway.nginx import (
    ROUTES_SOCKET,
    NginxPaths,
)
from activities.runtimes.gateway.tier import MAIN_FILES, TIERS, Gateway, Tier, listen_host
from mlc import endpoints
from mlc.errors import DeploymentFailedError

_CONTAINER_CONF = "/etc/mlc-gateway"
_CONTAINER_LOGS = "/var/log/mlc-gateway"
_CONTAINER_RUN = "/run/mlc-gateway"
_CONTAINER_SOCKETS = "/run/mlc-models"


class DockerGateway(Gateway):
    """Both tiers as containers on the runtime's engine: ``mlc-gateway-<runtime>`` (edge)
    and ``mlc-gateway-<runtime>-routes``, sharing the socket folder ``run/``."""

    LABEL = "mlc.gateway-runtime"
    """Not ``mlc.runtime``: the driver's cleanup removes that runtime's unkept containers."""

    def name(self, tier: Tier) -> str:
        """The tier's container name."""
        return f"mlc-gateway-{self.runtime.name}" + ("-routes" if tier == "routes" else "")

    @property
    def paths(self) -> NginxPaths:
        """Mount points inside the containers; temp files and pids in their tmpfs ``/tmp``."""
        return NginxPaths(
            conf=_CONTAINER_CONF, logs=_CONTAINER_LOGS, temp="/tmp", pid="/tmp", run=_CONTAINER_RUN
        )

    def worker_user(self) -> str | None:
        """None: the containers run as ``docker.user`` already."""
        return None

    def backend_address(self, deployment_id: str, address: str) -> str:
        """A model container's socket as the gateway's containers see it: the runtime's
        sockets folder is mounted at a short path (a socket's name holds 107 bytes).

        Raises:
            RefusedError: a socket outside the runtime's sockets folder.
        """
        root = f"{endpoints.UNIX_PREFIX}{sockets_root(self.settings, self.runtime)}/"
        if address.startswith(root):
            return f"{endpoints.UNIX_PREFIX}{_CONTAINER_SOCKETS}/{address.removeprefix(root)}"
        return super().backend_address(deployment_id, address)

    def _network(self) -> str:
        return docker_settings(self.runtime).network_mode

    def edge_listen(self) -> str:
        """Host network: the gateway's address; else every address of the container's own
        network, published on ``gateway.host:port``."""
        host = listen_host(self.config.host) if self._network() == "host" else "0.0.0.0"
        return f"{host}:{self.config.port}"

    def _prepare(self) -> None:
        super()._prepare()
        uid, _, gid = docker_settings(self.runtime).user.partition(":")
        for folder in (self.logs, self.root / "run"):
            folder.mkdir(parents=True, exist_ok=True)
            if uid.isdigit() and (not gid or gid.isdigit()):  # the containers' user writes here
                os.chown(folder, int(uid), int(gid or uid), follow_symlinks=False)
                os.chmod(folder, 0o700)
            else:  # a user name: only the engine knows its uid
                os.chmod(folder, 0o1777)

    def _wanted(self, tier: Tier) -> str:
        # "uds": gateways started before model sockets were mounted are replaced
        return f"{tier} {self._network()} {self.config.host}:{self.config.port} uds"

    async def _container(self, tier: Tier) -> Any:
        async with connect(self.runtime, "find the gateway containers") as client:
            try:
                return await asyncio.to_thread(client.containers.get, self.name(tier))
            except docker.errors.NotFound:
                return None

    async def running(self, tier: Tier) -> bool:
        """The tier's container runs with the runtime's current settings."""
        container = await self._container(tier)
        if container is None or container.status != "running":
            return False
        return bool(container.labels.get("mlc.gateway-settings") == self._wanted(tier))

    async def start(self, tier: Tier, heartbeat: Heartbeat) -> None:
        """Build the image if needed, remove a stale container, run the tier's."""
        settings = docker_settings(self.runtime)
        if tier == "routes":
            (self.root / "run" / ROUTES_SOCKET).unlink(missing_ok=True)
        async with connect(self.runtime, f"start the gateway's {tier} container") as client:
            image = await run_with_heartbeats(
                lambda _progress: ensure_gateway_image(client),
                heartbeat,
                first_note=f"building the gateway image of runtime {self.runtime.name}",
            )
            with contextlib.suppress(docker.errors.NotFound):
                old = await asyncio.to_thread(client.containers.get, self.name(tier))
                await asyncio.to_thread(old.remove, force=True)
            options: dict[str, Any] = {"network_mode": settings.network_mode}
            if tier == "edge" and settings.network_mode != "host":
                options["ports"] = {f"{self.config.port}/tcp": (self.config.host, self.config.port)}
            sockets = sockets_root(self.settings, self.runtime)
            sockets.mkdir(parents=True, exist_ok=True)
            volumes = {
                str(self.conf): {"bind": _CONTAINER_CONF, "mode": "ro"},
                str(self.logs): {"bind": _CONTAINER_LOGS, "mode": "rw"},
                str(self.root / "run"): {"bind": _CONTAINER_RUN, "mode": "rw"},
                str(sockets): {"bind": _CONTAINER_SOCKETS, "mode": "ro"},  # the models' sockets
            }
            error_log = "error.log" if tier == "routes" else "edge.error.log"
            await asyncio.to_thread(
                client.containers.run,
                image,
                [
                    "-p",
                    "/tmp/",
                    "-c",
                    f"{_CONTAINER_CONF}/{MAIN_FILES[tier]}",
                    "-e",
                    f"{_CONTAINER_LOGS}/{error_log}",
                ],
                name=self.name(tier),
                labels={self.LABEL: self.runtime.name, "mlc.gateway-settings": self._wanted(tier)},
                detach=True,
                restart_policy={"Name": "unless-stopped"},
                user=settings.user,
                read_only=True,
                tmpfs={"/tmp": "rw,nosuid,nodev,size=256m"},
                security_opt=["no-new-privileges"],
                cap_drop=["ALL"],
                volumes=volumes,
                **options,
            )

    async def test(self, tier: Tier) -> str | None:
        """``nginx -t`` inside the tier's running container; before it runs, None: a
        container whose nginx refuses its files exits, and the start reports its log."""
        container = await self._container(tier)
        if container is None or container.status != "running":
            return None
        command = [
            "/usr/sbin/nginx", "-t", "-q", "-p", "/tmp/", "-c", f"{_CONTAINER_CONF}/{MAIN_FILES[tier]}",
            "-e", "stderr",
        ]  # fmt: skip
        code, output = await asyncio.to_thread(container.exec_run, command)
        return None if code == 0 else bytes(output).decode(errors="replace").strip()

    async def signal(self, tier: Tier, signum: signal.Signals) -> None:
        """``docker kill --signal`` to the tier's nginx master (its pid 1)."""
        container = await self._container(tier)
        if container is None or container.status != "running":
            raise DeploymentFailedError(
                f"the gateway container {self.name(tier)} of runtime {self.runtime.name} is not running"
            )
        await asyncio.to_thread(container.kill, signum.name)

    def details(self) -> dict[str, Any]:
        """The containers and the configuration folder."""
        return {
            "container_name": self.name("edge"),
            "routes_container_name": self.name("routes"),
            "config": str(self.conf),
            "logs": str(self.logs),
        }

    async def stop(self) -> None:
        """Remove both containers."""
        for tier in reversed(TIERS):
            container = await self._container(tier)
            if container is not None:
                await asyncio.to_thread(container.remove, force=True)

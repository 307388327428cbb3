"""A runtime's gateway: one nginx in front of its online deployments, giving stable endpoints.

Consumers call ``http://HOST:PORT/models/MODEL/score`` (the runtime's
:class:`~mlc.domain.GatewaySettings`) and never change it; which deployments answer, with
which share, and which one sees a mirrored copy is the model's routes, applied here.

Files live on the worker's host in ``<runtime_dir>/_gateways/<runtime>/`` (beside the
runtime folders, so a runtime's cleanup, which removes every folder of
``<runtime_dir>/<runtime>/`` not kept, never touches them): ``conf/`` (the main
``nginx.conf``, ``generation.conf`` and each model's two files, see
:mod:`activities.runtimes.gateway.nginx`), ``logs/`` (access, mirror and error logs) and
``gateway.json`` (the local master's pid).

- **local** runtimes run nginx as a detached process (its workers as the installation's
  gateway user, :func:`mlc.isolation.service_user`, when the worker is root), found again
  from ``gateway.json``: a worker restart keeps the endpoint.
- **docker** runtimes run it as the container ``mlc-gateway-<runtime>`` of an image made
  from the host's nginx (:mod:`activities.runtimes.gateway.image`), ``conf/`` mounted
  read-only and ``logs/`` read-write, hardened like model containers. With
  ``network_mode: host`` it listens on ``gateway.host:port`` of the engine's host; with a
  bridge network it publishes ``gateway.port`` on ``gateway.host`` (only host mode is
  tested here). Either way it reaches the model containers, which have no network, on
  their unix sockets: the runtime's sockets folder (``<runtime_dir>/_sockets/<runtime>``)
  is mounted read-only at ``/run/mlc-models``. The gateway stays a container rather than
  moving to the host: it runs as ``docker.user``, the owner of the models' 0700 socket
  folders, so it opens them without root, and it needs nothing installed on the host
  but the nginx binary its image is made of.

A traffic change writes the model's files (temp file, then rename), checks the whole
configuration with ``nginx -t`` (restoring the previous files if it fails), then reloads
gracefully (SIGHUP): new connections get the new routes while the old workers finish the
requests they hold, and the old deployments stay up until the caller retires them. It
returns only once the gateway serves the new configuration's generation marker. Changes of
one endpoint take turns, and the newest decision waiting is applied once for all that
waited with it (see ``routing._Queue``).

Modules: ``tier`` (what every tier shares), ``nginx`` (configuration rendering and log
parsing), ``image`` (the nginx binary and the docker tier's image), ``port`` (who holds a
gateway's port), ``routing`` (route, observe, and :class:`GatewayRouted`, the drivers'
side). Each kind keeps its own tier: :mod:`activities.runtimes.local.gateway` (nginx
processes) and :mod:`activities.runtimes.docker.gateway` (containers); the registry
(:func:`activities.runtimes.registry.gateway_for`) finds a runtime's.
"""

from __future__ import annotations

from activities.runtimes.gateway.routing import GatewayRouted, observe, route
from activities.runtimes.gateway.tier import GATEWAYS_DIR, Gateway, gateway_root

__all__ = [
    "GATEWAYS_DIR",
    "Gateway",
    "GatewayRouted",
    "gateway_root",
    "observe",
    "route",
]

"""nginx configuration of a runtime's gateway, and reading what the gateway logged.

Pure functions, no processes: :mod:`activities.runtimes.gateway` writes what these render
and reloads the proxy. The configuration is one main file per runtime and two files per
model, so changing one model's routes rewrites only that model's files:

- ``http/MODEL.conf`` (http context): one ``upstream`` per deployment (``keepalive``
  connections, so the gateway adds little to a request), a ``split_clients`` on the
  random ``$request_id`` choosing among them by weight, and the shadow's log format;
- ``models/MODEL.conf`` (server context): ``location ~ ^/models/MODEL(/.*)$``, which strips
  the prefix (the model server gets ``/score``, ``/health``, ``/metrics``, after the
  deployment's own path prefix when it is hosted in a shared process: a ``map`` on the
  chosen deployment when there are several), passes the
  request to the chosen deployment with ``X-Request-ID`` and, with a shadow, mirrors it
  to the shadow deployment, both with the capture header that makes the model servers
  record their answers. With no answering route it answers 503 with a JSON message.

Every live request is logged as one JSON line in ``MODEL.access.log`` (time, deployment,
status, latency, request id); mirrored requests go to ``MODEL.mirror.log``, never to the
access log, so a shadow's traffic never counts as live traffic.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mlc import endpoints
from mlc.contracts.traffic import RouteStats, ShadowComparison
from mlc.domain import TrafficRoute

CAPTURE_HEADER = "X-MLC-Capture"
"""Set by the gateway only (a client's value is overwritten): the model server records its
answer to this request (see :mod:`mlc.serving.capture`)."""
DEPLOYMENT_HEADER = "X-MLC-Deployment"
"""Response header naming the deployment that answered (for consumers' debugging)."""
STATUS_PATH = "/_mlc/gateway"
"""Answers the configuration generation; ``STATUS_PATH/KEY`` adds the gateway's proof (see
:func:`render_generation`): the gateway polls it to know a reload took effect."""

ROUTES_SOCKET = "routes.sock"
"""The routing tier's unix socket, in :attr:`NginxPaths.run`."""
LOG_FORMAT = "mlc_traffic"
LOG_FLUSH_SECONDS = 1.0
LOG_BUFFER = f"buffer=64k flush={LOG_FLUSH_SECONDS:.0f}s"
"""Access logs are written in blocks (one write per 64 KiB or second, not per request)."""
_NOT_FOUND = '{{"error": "no such endpoint on the gateway of runtime {runtime}: call /models/MODEL/score"}}\n'
_PATH = r"(?:/[A-Za-z0-9._\-]+)*"
_UNSAFE = re.compile(r"[\s;{}'\"\\$#:]")
"""What a socket path in nginx's configuration may not hold."""
_LOG_FIELDS = (
    '"t":$msec,"route":"{route}","status":$status,"upstream_status":"$upstream_status",'
    '"request_time":$request_time,"upstream_time":"$upstream_response_time","id":"$request_id"'
)


@dataclass(frozen=True)
class NginxPaths:
    """Where files are *as nginx sees them* (host paths locally, mount points in a container)."""

    conf: str
    """Folder of ``nginx.conf``, ``generation.conf``, ``http/`` and ``models/``."""
    logs: str
    """Writable folder of the access, mirror and error logs."""
    temp: str
    """Writable folder for request bodies nginx must buffer (the worker user's)."""
    pid: str
    """Folder of the masters' pid files."""
    run: str
    """Folder of the routing tier's socket, reachable by the edge tier's workers."""


@dataclass(frozen=True)
class Backend:
    """One deployment behind a model's endpoint, located by the runtime's driver."""

    route: TrafficRoute
    address: str
    """``host:port`` of its model server, or ``unix:PATH`` of its socket (as nginx sees it)."""
    prefix: str = ""
    """The path before the server's own routes: ``/models/<id>`` for a model in a shared
    host, empty for a server of its own."""


def _q(value: str) -> str:
    """``value`` as a single-quoted nginx string (the values here never hold a quote)."""
    if "'" in value or "\\" in value:
        raise ValueError(f"cannot quote {value!r} for nginx")
    return f"'{value}'"


def model_key(model: str) -> str:
    """An nginx variable suffix for ``model``: letters, digits and ``_``, unique per name."""
    digest = hashlib.sha256(model.encode()).hexdigest()[:6]
    return f"{re.sub(r'[^a-z0-9]', '_', model)}_{digest}"


def endpoint_parts(endpoint: str) -> tuple[str, str]:
    """``host:port`` (``unix:SOCKET`` for a model on a unix socket) and path prefix
    (``/models/<id>`` in a shared host, else empty) of an endpoint as drivers report them."""
    if endpoint.startswith(endpoints.UNIX_PREFIX):
        target = endpoints.parse(endpoint)
        prefix = target.url[len(endpoints.SOCKET_BASE_URL) :]
        if target.socket is None or _UNSAFE.search(str(target.socket)) or not re.fullmatch(_PATH, prefix):
            raise ValueError(f"endpoint {endpoint!r} is not unix:/SOCKET.sock[/PATH] with a plain path")
        return f"{endpoints.UNIX_PREFIX}{target.socket}", prefix
    match = re.fullmatch(rf"http://([A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):(\d{{1,5}})({_PATH})/?", endpoint)
    if match is None:
        raise ValueError(f"endpoint {endpoint!r} is not http://HOST:PORT[/PATH]")
    return f"{match.group(1)}:{match.group(2)}", match.group(3)


def render_routes_main(*, runtime: str, paths: NginxPaths, user: str | None) -> str:
    """The routing tier's ``nginx.conf``: one server on the tier socket including every
    model's files; it is the tier that reloads on every traffic change.

    Args:
        runtime: The runtime's name (for the comments and the 404 message).
        paths: Where nginx finds its files.
        user: ``USER GROUP`` for the worker processes when the master runs as root.
    """
    user_line = f"user {user};\n" if user else ""
    return f"""\
# Written by MLC for the gateway of runtime {runtime} (routing tier); rewritten on every
# traffic change and reloaded gracefully.
{user_line}daemon off;
# one worker per tier: tens of thousands of small requests/s, more than a model server
# answers, and fewer processes competing with the model servers on a small host
worker_processes 1;
worker_shutdown_timeout 120s;
pid {paths.pid}/routes.pid;
error_log {paths.logs}/error.log warn;
pcre_jit on;

events {{
    worker_connections 4096;
}}

http {{
    default_type application/json;
    access_log off;
    server_tokens off;
{_temp_paths(paths.temp)}\
    client_max_body_size 0;
    client_body_buffer_size 1m;
    keepalive_timeout 75s;
    keepalive_requests 100000;
    proxy_http_version 1.1;
    proxy_buffer_size 16k;
    proxy_buffers 32 16k;
    proxy_max_temp_file_size 0;
    proxy_connect_timeout 5s;
    proxy_send_timeout 300s;
    proxy_read_timeout 300s;
    # Scoring has no side effects: a request whose pooled upstream connection was closed
    # under it is sent again on a fresh one instead of failing.
    proxy_next_upstream error timeout non_idempotent;
    proxy_next_upstream_tries 2;
    log_format {LOG_FORMAT} escape=json '{{{_LOG_FIELDS.format(route="$mlc_route")}}}';

    include {paths.conf}/http/*.conf;

    server {{
        listen unix:{paths.run}/{ROUTES_SOCKET};
        include {paths.conf}/generation.conf;
        location = /_mlc/declare {{
            # never matched by a live request: declares the variables the locations set
            # (a server-level "set" would also run in mirror subrequests, which share them)
            internal;
            set $mlc_route "";
            set $mlc_path "";
            return 404;
        }}
        include {paths.conf}/models/*.conf;
        location / {{
            return 404 {_q(_NOT_FOUND.format(runtime=runtime))};
        }}
    }}
}}
"""


def render_edge(*, runtime: str, listen: str, paths: NginxPaths, user: str | None) -> str:
    """The edge tier's ``edge.conf``: listens on the gateway's address and passes every
    request over pooled connections to the routing tier. It never reloads for a traffic
    change, so consumers' connections are never closed under them; when the routing tier
    reloads, its old workers close their idle connections and a request the edge sent on
    one is sent again on a fresh connection (nginx retries a failed cached connection).
    """
    user_line = f"user {user};\n" if user else ""
    return f"""\
# Written by MLC for the gateway of runtime {runtime} (edge tier): consumers connect here.
{user_line}daemon off;
worker_processes 1;
worker_shutdown_timeout 120s;
pid {paths.pid}/edge.pid;
error_log {paths.logs}/edge.error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    default_type application/json;
    access_log off;
    server_tokens off;
{_temp_paths(paths.temp, prefix="edge_")}\
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    keepalive_timeout 75s;
    keepalive_requests 100000;
    proxy_http_version 1.1;
    proxy_buffer_size 16k;
    proxy_buffers 32 16k;
    proxy_buffering off;
    proxy_read_timeout 300s;
    proxy_send_timeout 300s;
    proxy_next_upstream error timeout non_idempotent;
    proxy_next_upstream_tries 3;

    upstream mlc_routes {{
        server unix:{paths.run}/{ROUTES_SOCKET} max_fails=0;
        keepalive 64;
        keepalive_requests 100000;
        keepalive_timeout 60s;
    }}

    server {{
        listen {listen};
        location / {{
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_pass http://mlc_routes;
        }}
    }}
}}
"""


def _temp_paths(temp: str, *, prefix: str = "") -> str:
    return "".join(
        f"    {kind}_temp_path {temp}/{prefix}{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def render_generation(runtime: str, generation: str, *, key: str, proof: str) -> str:
    """``generation.conf``: the status locations answering which configuration is live.

    ``STATUS_PATH/KEY`` answers with ``proof`` too: the gateway's own check that the
    answer comes from its nginx, not from a program that took its port while it was down
    (which sees ``key`` in the request, never ``proof``; both are random and root's).
    """
    body = json.dumps({"runtime": runtime, "generation": generation})
    proven = json.dumps({"runtime": runtime, "generation": generation, "proof": proof})
    if not re.fullmatch(r"[0-9a-f]{16,64}", key):
        raise ValueError("the gateway's probe key is not hex")
    return (
        f"location = {STATUS_PATH} {{\n    access_log off;\n    return 200 {_q(body)};\n}}\n"
        f"location = {STATUS_PATH}/{key} {{\n    access_log off;\n    return 200 {_q(proven)};\n}}\n"
    )


def render_model(*, runtime: str, model: str, backends: Sequence[Backend], logs: str) -> tuple[str, str]:
    """The model's ``http/MODEL.conf`` and ``models/MODEL.conf``.

    Args:
        runtime: The runtime's name (for the 503 message).
        model: A valid model name (see :func:`mlc.domain.check_name`).
        backends: Its routes with their addresses, already checked with ``check_routes``.
        logs: The logs folder as nginx sees it.
    """
    key = model_key(model)
    answering = [b for b in backends if not b.route.shadow and b.route.weight > 0]
    shadow = next((b for b in backends if b.route.shadow), None)
    http: list[str] = [f"# Routes of model {model} on runtime {runtime}: written by MLC.\n"]
    for backend in backends:
        if backend.route.shadow or backend.route.weight > 0:
            http.append(
                f"upstream {backend.route.deployment_id} {{\n"
                f"    server {backend.address} max_fails=0;\n"
                "    keepalive 32;\n"
                "    keepalive_requests 100000;\n"
                "    keepalive_timeout 4s;\n"  # under uvicorn's 5 s: nginx closes idle ones first
                "}\n"
            )
    if len(answering) > 1:
        lines = [f"    {b.route.weight}% {b.route.deployment_id};\n" for b in answering[:-1]]
        lines.append(f"    * {answering[-1].route.deployment_id};\n")
        http.append(f'split_clients "$request_id" $mlc_split_{key} {{\n{"".join(lines)}}}\n')
    prefixed = len(answering) > 1 and any(b.prefix for b in answering)
    if prefixed:  # each deployment's path in its server, for the chosen one
        lines = [f"    {b.route.deployment_id} {_q(b.prefix)};\n" for b in answering]
        http.append(f"map $mlc_route $mlc_prefix_{key} {{\n    default '';\n{''.join(lines)}}}\n")
    if shadow is not None:
        fields = _LOG_FIELDS.format(route=shadow.route.deployment_id)
        http.append(f"log_format mlc_mirror_{key} escape=json '{{{fields}}}';\n")

    pattern = f"^/models/{re.escape(model).replace('/', '')}(/.*)$"
    server = [f"# Endpoint of model {model} on runtime {runtime}: written by MLC.\n"]
    server.append(f"location ~ {pattern} {{\n    set $mlc_path $1;\n")
    if not answering:
        message = json.dumps(
            {
                "error": f"model {model} has no serving version behind this endpoint on runtime "
                f"{runtime}; promote or roll back a version to route traffic here",
                "model": model,
            }
        )
        server.append(
            f"    access_log {logs}/{model}.access.log {LOG_FORMAT} {LOG_BUFFER};\n"
            f"    return 503 {_q(message + chr(10))};\n}}\n"
        )
        return "".join(http), "".join(server)
    chosen = f"$mlc_split_{key}" if len(answering) > 1 else answering[0].route.deployment_id
    capture = "1" if shadow is not None else ""
    server.append(
        f"    set $mlc_route {chosen};\n"
        f"    access_log {logs}/{model}.access.log {LOG_FORMAT} {LOG_BUFFER};\n"
        f'    add_header {DEPLOYMENT_HEADER} "$mlc_route" always;\n'
        '    proxy_set_header Connection "";\n'
        "    proxy_set_header X-Request-ID $request_id;\n"
        f'    proxy_set_header {CAPTURE_HEADER} "{capture}";\n'
    )
    if shadow is not None:
        server.append(f"    mirror /_mlc/mirror/{model};\n    mirror_request_body on;\n")
    prefix = f"$mlc_prefix_{key}" if prefixed else answering[0].prefix if len(answering) == 1 else ""
    # One answering route names its upstream: nginx resolves a variable's upstream by parsing
    # the URL and searching the upstreams on every request (measured: ~1,300 instructions).
    upstream = chosen if len(answering) == 1 else "$mlc_route"
    server.append(f"    rewrite ^ {prefix}$mlc_path break;\n    proxy_pass http://{upstream};\n}}\n")
    if shadow is not None:
        server.append(
            f"location = /_mlc/mirror/{model} {{\n"
            "    internal;\n"
            "    log_subrequest on;\n"
            f"    access_log {logs}/{model}.mirror.log mlc_mirror_{key} {LOG_BUFFER};\n"
            '    proxy_set_header Connection "";\n'
            "    proxy_set_header X-Request-ID $request_id;\n"
            f'    proxy_set_header {CAPTURE_HEADER} "1";\n'
            f"    rewrite ^ {shadow.prefix}$mlc_path break;\n"
            f"    proxy_pass http://{shadow.route.deployment_id};\n"
            "}\n"
        )
    return "".join(http), "".join(server)


# --- reading what the gateway saw -----------------------------------------------------


def parse_log(lines: Iterable[str], since: datetime, until: datetime) -> list[dict[str, Any]]:
    """Entries of a gateway log (JSON lines) whose time is in ``[since, until]``."""
    start, end = since.timestamp(), until.timestamp()
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written, or a log from another format
        if isinstance(entry, dict) and start <= float(entry.get("t", -1)) <= end:
            entries.append(entry)
    return entries


def _seconds(entry: Mapping[str, Any]) -> float | None:
    """The model's answer time: the upstream's (summed over a retry), else the request's."""
    text = str(entry.get("upstream_time") or "")
    parts = [p.strip() for p in text.replace(":", ",").split(",") if p.strip() not in ("", "-")]
    if parts:
        try:
            return sum(float(p) for p in parts)
        except ValueError:
            pass
    value = entry.get("request_time")
    return float(value) if isinstance(value, int | float) else None


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of ascending ``sorted_values`` (not empty)."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def route_stats(route: TrafficRoute, entries: Iterable[Mapping[str, Any]]) -> RouteStats:
    """Requests, server errors and latency (ms) of ``route`` among ``entries``."""
    mine = [e for e in entries if e.get("route") == route.deployment_id]
    times = sorted(t * 1000.0 for t in (_seconds(e) for e in mine) if t is not None)
    return RouteStats(
        deployment_id=route.deployment_id,
        version=route.version,
        requests=len(mine),
        errors=sum(1 for e in mine if int(e.get("status", 0)) >= 500),
        p50_ms=round(_percentile(times, 0.50), 3) if times else None,
        p99_ms=round(_percentile(times, 0.99), 3) if times else None,
    )


def _split(output: Any) -> tuple[tuple[Any, ...], dict[str, float]]:
    """A record's answer as (label, scores): its non-float fields and its float fields.

    ``{"probability": 0.93, "is_fraud": 1}`` is label ``(("is_fraud", 1),)`` and scores
    ``{"probability": 0.93}``: labels are what a consumer acts on (classes, decisions, ids),
    scores are the continuous outputs behind them.
    """
    if not isinstance(output, dict):
        return (("value", json.dumps(output, sort_keys=True)),), {}
    label, scores = [], {}
    for name in sorted(output):
        value = output[name]
        if isinstance(value, float):
            scores[name] = value
        elif isinstance(value, bool | int | str) or value is None:
            label.append((name, value))
        else:
            label.append((name, json.dumps(value, sort_keys=True)))
    return tuple(label), scores


def compare(
    *,
    primary_id: str,
    shadow_id: str,
    primary: Mapping[str, Any],
    shadow: Mapping[str, Any],
    shadow_errors: int = 0,
) -> ShadowComparison:
    """Both versions' answers to the same requests (joined by request id), compared.

    Args:
        primary_id: The answering deployment whose captures are ``primary``.
        shadow_id: The shadow deployment.
        primary: Request id -> the primary's answer (one output dict, or a list for a batch).
        shadow: Request id -> the shadow's answer.
        shadow_errors: Mirrored requests the shadow answered with a server error.
    """
    pairs = agree = records = 0
    diffs: list[float] = []
    for request_id, answer in primary.items():
        if request_id not in shadow:
            continue
        pairs += 1
        left = answer if isinstance(answer, list) else [answer]
        right = shadow[request_id] if isinstance(shadow[request_id], list) else [shadow[request_id]]
        for one, other in zip(left, right, strict=False):
            records += 1
            (label_a, scores_a), (label_b, scores_b) = _split(one), _split(other)
            agree += label_a == label_b
            shared = scores_a.keys() & scores_b.keys()
            if shared:
                diffs.append(max(abs(scores_a[k] - scores_b[k]) for k in shared))
        records += abs(len(left) - len(right))  # records only one side answered disagree
    return ShadowComparison(
        primary_id=primary_id,
        shadow_id=shadow_id,
        pairs=pairs,
        agreement_rate=agree / records if records else None,
        mean_abs_diff=sum(diffs) / len(diffs) if diffs else None,
        max_abs_diff=max(diffs) if diffs else None,
        shadow_errors=shadow_errors,
    )

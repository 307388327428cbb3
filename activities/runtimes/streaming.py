"""Streaming deployments on runtimes: what every driver shares, and the local runtime's part.

A streaming deployment is one or more long-running consumers (``python -m mlc.streaming
consume``; see :mod:`mlc.streaming.consumer`) scoring the runtime's input topic into its
output topic, in the consumer group every version of the model on that runtime shares.
Locally each consumer is a child process; on docker runtimes a container
(:mod:`activities.runtimes.streaming_docker`).

Deploying creates the topics the runtime is allowed to create and the deployment's own
test topics, starts the missing consumers and returns once each has loaded the model
and said it is ready. Redeploying the same deployment keeps consumers that run with the
same configuration and snapshot and restarts dead ones (after a ``kill -9``, say), so it
is idempotent; a changed configuration (``standby`` lifted at promotion) restarts them
all, each stopped cleanly first: SIGTERM lets a consumer finish its batch, commit and
leave the group, so the next one starts exactly at the committed offsets.

Local consumers run with an allow-listed environment (plus the runtime's SASL password,
which they need), and when the worker is root as the deployment's own unprivileged user in
its folder (see :mod:`mlc.isolation`). They talk to the broker, so they keep the host's
network; model code must not, so they import none: each batch goes to the deployment's
own model server (``server.sock`` in its folder), which runs in a network namespace of its
own like every local server (see :class:`mlc.streaming.consumer.RemoteModel`). It is
started before the consumers, recorded as ``scorer`` and started again by a redeploy that
finds it dead (consumers retry their batch meanwhile; nothing is dead-lettered for it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from activities.runtimes.base import Heartbeat, StreamingDeployRequest, StreamingDeployResult
from mlc import isolation, processes
from mlc.domain import Runtime
from mlc.errors import DeploymentFailedError
from mlc.kafka_settings import KafkaSettings
from mlc.streaming.consumer import READY_LINE, STREAM_CONFIG_ENV
from mlc.streaming.settings import StreamConfig, test_topics, with_secret
from mlc.streaming.topics import delete_topics, ensure_topics, wait_until_settled

if TYPE_CHECKING:
    from activities.runtimes.local import LocalDriver

READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
"""A consumer finishes its batch (at most ``DELIVERY_TIMEOUT_SECONDS`` of acknowledgements),
commits and leaves its group within this; then it is killed (and its batch redelivered)."""
QUICK_STOP_SECONDS = 5.0
STATE_FILE = "streaming.json"
CONSUMER_MARKER = "mlc.streaming"
"""In every consumer's command line: a recorded pid is ours only while it still says so."""
LOG_TAIL_LINES = 20
SCORE_SOCKET = "server.sock"
"""The deployment's model server's socket, relative to the consumers' working folder (its
folder): a relative name fits a socket address however long ``MLC_HOME`` is."""

log = logging.getLogger(__name__)

_children: dict[int, subprocess.Popen[bytes]] = {}
"""Consumers this process started, kept so exits are reaped."""


def kafka_of(runtime: Runtime) -> KafkaSettings:
    """The runtime's ``kafka`` settings, or an error saying how to add them."""
    if runtime.kafka is None:
        raise DeploymentFailedError(
            f"runtime {runtime.name} has no kafka settings; add them with `mlc runtime add "
            f"{runtime.name} --replace --mode streaming --kafka-bootstrap HOST:PORT --input-topic IN "
            "--output-topic OUT ...`"
        )
    return runtime.kafka


def stream_config(request: StreamingDeployRequest) -> StreamConfig:
    """The consumers' configuration for a granted deployment."""
    return StreamConfig.build(
        kafka_of(request.runtime),
        runtime=request.runtime.name,
        deployment_id=request.deployment_id,
        model=request.snapshot.model,
        version=request.snapshot.version,
        standby=request.standby,
    )


async def prepare_topics(kafka: KafkaSettings, config: StreamConfig, environ: dict[str, str]) -> None:
    """Create the business topics (when the runtime may) and the deployment's test topics."""
    client = _client(kafka, environ)
    topics = {config.test_input_topic: 1, config.test_output_topic: 1}
    if kafka.create_topics:
        topics.update(
            {
                config.input_topic: kafka.partitions,
                config.output_topic: kafka.partitions,
                config.dead_letter_topic: kafka.partitions,
            }
        )
    await asyncio.to_thread(ensure_topics, client, topics, replication_factor=kafka.replication_factor)


async def drop_test_topics(runtime: Runtime, deployment_id: str) -> None:
    """Delete a deployment's test topics; a broker that cannot be reached only leaves them behind."""
    if runtime.kafka is None:
        return
    try:
        client = _client(runtime.kafka, dict(os.environ))
        await asyncio.to_thread(delete_topics, client, list(test_topics(deployment_id)))
    except Exception as exc:  # undeploy must not fail over leftovers of a few test records
        log.warning("could not delete the test topics of %s: %s", deployment_id, exc)


def _client(kafka: KafkaSettings, environ: dict[str, str]) -> dict[str, str]:
    """Connection settings with the SASL password from ``environ`` (the worker's own)."""
    try:
        return with_secret(kafka.client_config(), kafka.sasl_password_env, environ)
    except ValueError as exc:
        raise DeploymentFailedError(str(exc)) from None


def endpoint_of(config: StreamConfig) -> str:
    """How ``mlc deployments`` shows where a streaming deployment reads: ``kafka://BROKERS/TOPIC``."""
    return f"kafka://{config.client['bootstrap.servers']}/{config.input_topic}"


def result_details(config: StreamConfig, **extra: Any) -> dict[str, Any]:
    """Deployment details every driver records for a streaming deployment."""
    return {
        "input_topic": config.input_topic,
        "output_topic": config.output_topic,
        "dead_letter_topic": config.dead_letter_topic,
        "consumer_group": config.group,
        "test_topics": [config.test_input_topic, config.test_output_topic],
        "standby": config.standby,
        **extra,
    }


# --- the local runtime ---------------------------------------------------------------------


async def deploy_local(
    driver: LocalDriver, request: StreamingDeployRequest, heartbeat: Heartbeat
) -> StreamingDeployResult:
    """Start (or keep) the deployment's consumer processes and wait until each is ready.

    Raises:
        DeploymentFailedError: no kafka settings, the broker refused, or a consumer exited
            or stayed silent at start (with its log's last lines).
        RuntimeUnavailableError: the broker cannot be reached.
    """
    from activities.runtimes.local import _alive as local_alive
    from activities.runtimes.local import child_env

    kafka = kafka_of(request.runtime)
    config = stream_config(request)
    workdir = driver.workdir(request.runtime, request.deployment_id)
    heartbeat(f"preparing topics on {kafka.bootstrap_servers}")
    await prepare_topics(kafka, config, dict(os.environ))
    wanted = {"sha256": request.snapshot.sha256, "config": config.model_dump(mode="json")}
    state = _read_state(workdir)
    recorded: list[int] = list(state.get("pids", [])) if state else []
    if state is not None and all(state.get(k) == v for k, v in wanted.items()):
        # Same snapshot and configuration: keep live consumers, restart dead ones.
        await stop_in_turn([_stopper(pid) for pid in recorded[kafka.instances :]], config, leaving=True)
        kept = recorded[: kafka.instances]
        pids: list[int | None] = [p if _alive(p) else None for p in kept]
        pids += [None] * (kafka.instances - len(kept))
    else:
        if state is not None:
            previous = StreamConfig.model_validate(state["config"])
            await stop_in_turn([_stopper(pid) for pid in recorded], previous)
        pids = [None] * kafka.instances
    # A fresh start (no consumer kept) also ends whatever else the deployment's user runs.
    fresh = all(p is None for p in pids)
    # The consumers talk to the broker: they keep the host's network and run no model code;
    # the model's server scores for them, off the network.
    user, package = await asyncio.to_thread(
        driver.prepare, request.runtime, request.snapshot, workdir, fresh=fresh, own_network=False
    )
    scorer = state.get("scorer") if state is not None and not fresh else None
    if not isinstance(scorer, int) or not local_alive(scorer):
        scorer = await driver.start_scorer(request, workdir, package, user, heartbeat)
    env = child_env(request.snapshot, workdir)
    env[STREAM_CONFIG_ENV] = config.model_dump_json()
    if kafka.sasl_password_env and kafka.sasl_password_env in os.environ:
        env[kafka.sasl_password_env] = os.environ[kafka.sasl_password_env]
    started: dict[int, int] = {}
    for index, pid in enumerate(pids):
        if pid is None:
            log_path = workdir / f"consumer-{index}.log"
            with isolation.open_log(log_path, user) as log_file:
                offset = os.fstat(log_file.fileno()).st_size
                process = isolation.spawn(
                    [
                        sys.executable,
                        "-s",
                        "-P",
                        "-m",
                        "mlc.streaming",
                        "consume",
                        "--package",
                        str(package),
                        "--score-socket",
                        SCORE_SOCKET,
                    ],  # fmt: skip
                    log=log_file,
                    user=user,
                    die_with_parent=driver.settings.servers_die_with_worker,
                    cwd=workdir,
                    env=env,
                )
            _children[process.pid] = process
            pids[index] = process.pid
            started[index] = offset
    live = [p for p in pids if p is not None]
    _write_state(workdir, {**wanted, "pids": live, "scorer": scorer, "started_at": time.time()})
    for index, offset in started.items():
        await _wait_ready(request, workdir, index, live[index], offset, heartbeat)
    return StreamingDeployResult(
        endpoint=endpoint_of(config),
        details=result_details(
            config, pids=live, logs=[str(workdir / f"consumer-{i}.log") for i in range(len(live))]
        ),
    )


async def stop_local(workdir: Path) -> None:
    """Stop the deployment's consumers cleanly (TERM: finish, commit, leave; KILL after a grace period)."""
    from activities.runtimes.local import _stop as stop_server

    state = _read_state(workdir)
    if state is not None:
        config = StreamConfig.model_validate(state["config"])
        await stop_in_turn([_stopper(pid) for pid in state.get("pids", [])], config)
        if isinstance(state.get("scorer"), int):
            await stop_server(int(state["scorer"]))
        (workdir / STATE_FILE).unlink(missing_ok=True)


async def stop_consumers(workdir: Path) -> None:
    """Stop the deployment's live consumers all at once, keeping the record, for ``mlc dev``
    stopping (the next deploy starts them again): TERM lets each commit its batch, within
    ``QUICK_STOP_SECONDS`` (the stack's own broker may be gone already; what is not
    committed is delivered again)."""
    await asyncio.gather(*(_stop(pid, timeout=QUICK_STOP_SECONDS) for pid in local_consumer_pids(workdir)))


Stop = Callable[[], Awaitable[None]]


async def stop_in_turn(stops: list[Stop], config: StreamConfig, *, leaving: bool = False) -> None:
    """Stop consumers one at a time, letting their group settle after each departure.

    ``leaving``: others of the deployment keep running, so the group must settle after the
    last of these too. Standby consumers are in no group. See
    :func:`mlc.streaming.topics.wait_until_settled` for why.
    """
    for index, stop in enumerate(stops):
        await stop()
        if (leaving or index < len(stops) - 1) and not config.standby:
            try:
                client = with_secret(config.client, config.password_env, os.environ)
            except ValueError:
                client = dict(config.client)
            if not await asyncio.to_thread(wait_until_settled, client, config.group):
                log.warning("consumer group %s did not settle after a consumer stopped", config.group)


def _stopper(pid: int) -> Stop:
    async def stop() -> None:
        await _stop(pid)

    return stop


def local_consumer_pids(workdir: Path) -> list[int]:
    """The live consumer processes recorded for a deployment (tests kill them)."""
    state = _read_state(workdir)
    return [pid for pid in (state or {}).get("pids", []) if _alive(pid)]


async def _wait_ready(
    request: StreamingDeployRequest, workdir: Path, index: int, pid: int, offset: int, heartbeat: Heartbeat
) -> None:
    log_path = workdir / f"consumer-{index}.log"
    what = (
        f"streaming consumer {index} of {request.snapshot.ref} (deployment {request.deployment_id}, "
        f"runtime {request.runtime.name})"
    )
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        if READY_LINE in (isolation.read_tail(log_path, offset=offset) or ""):
            return
        if not _alive(pid):
            child = _children.get(pid)
            code = (
                f" with code {child.returncode}" if child is not None and child.returncode is not None else ""
            )
            raise DeploymentFailedError(
                f"{what} exited during start{code}; last lines of {log_path}:\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            await _stop(pid)
            raise DeploymentFailedError(
                f"{what} was not ready within {READY_TIMEOUT_SECONDS:.0f} s and was stopped; "
                f"last lines of {log_path}:\n{_tail(log_path)}"
            )
        heartbeat(f"waiting for {what}")
        await asyncio.sleep(0.1)


def _read_state(workdir: Path) -> dict[str, Any] | None:
    """The runtime's record of the consumers, if this process's user wrote it (the model's
    user owns the folder, see :mod:`mlc.isolation`)."""
    text = isolation.read_own_file(workdir / STATE_FILE)
    try:
        state = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
    return dict(state) if isinstance(state, dict) and "config" in state else None


def _write_state(workdir: Path, state: dict[str, Any]) -> None:
    isolation.write_file(workdir / STATE_FILE, json.dumps(state))


def _alive(pid: int) -> bool:
    """True when ``pid`` is a live streaming consumer (reaping it first if it is our exited child)."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    return processes.alive(pid, marker=CONSUMER_MARKER)


async def _stop(pid: int, *, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    if _alive(pid):
        await asyncio.to_thread(
            processes.stop, pid, timeout=timeout, child=_children.get(pid), marker=CONSUMER_MARKER
        )
    _children.pop(pid, None)


def _tail(path: Path) -> str:
    text = isolation.read_tail(path)
    if text is None:
        return "(no log written)"
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])

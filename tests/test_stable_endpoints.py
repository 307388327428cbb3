"""Stable endpoints: one address per model, stage and runtime while versions come and go.

Real Temporal, PostgreSQL, model servers and gateways (local runtimes with a gateway):
promotion moves the stable endpoint (blue/green), the previous version stays warm for the
stage's grace and is retired by the runtime's reconciler, versions in flight at once keep
their own deployments, every change is in the audit trail, and a hostile authorization
request is refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.reconciler_runs import ensure_reconciler
from activities.runtimes.local.gateway import LocalGateway
from activities.traffic import RETIRE_AFTER, TrafficInventory
from mlc.contracts.lifecycle import SignedDecision
from mlc.contracts.traffic import AuthorizeTrafficInput, RecordTrafficInput
from mlc.domain import (
    ApprovalGate,
    Decision,
    Deployment,
    DeploymentState,
    DockerSettings,
    GatewaySettings,
    LifecycleSpec,
    ModelRef,
    ModelSnapshot,
    Runtime,
    RuntimeKind,
    StageSpec,
    TestKind,
    TrafficRoute,
)
from mlc.lifecycle_client import read_status, send_decision, sign_decision
from mlc.store import deployments, runtimes, traffic, trail
from mlc.trust import grants
from tests.conftest import APPROVER, DOCKER_BASE_IMAGE, Stack, call_model, gateway_settings
from tests.lifecycle_helpers import keep_history, wait_for_gate
from tests.test_gateway import SQUATTER

NO_GRACE = timedelta(0)


def spec(*stages: str, gate_last: bool = True, grace: timedelta = NO_GRACE) -> LifecycleSpec:
    """Stages with smoke tests and gates (the last one's only with ``gate_last``)."""
    return LifecycleSpec(
        stages=tuple(
            StageSpec(
                name=s,
                tests=(TestKind.SMOKE,),
                gate=ApprovalGate() if gate_last or i < len(stages) - 1 else None,
                grace=grace,
            )
            for i, s in enumerate(stages)
        )
    )


async def approve(stack: Stack, snap: ModelSnapshot, stage: str) -> None:
    """Sign and send an approval in process (what `mlc approve` does, without a subprocess)."""
    ref = ModelRef(model=snap.model, version=snap.version)
    handle, envelope = await sign_decision(
        stack.client, stack.pool, stack.signers[APPROVER], ref, stage=stage, decision=Decision.APPROVED
    )
    await send_decision(handle, ref, SignedDecision(envelope=envelope), approve=True)


async def answering_version(endpoint: str) -> int | None:
    """The version answering a stable endpoint's ``/health``."""
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{endpoint}/health", timeout=10)
    assert answer.status_code == 200, f"{endpoint}/health answered {answer.status_code}: {answer.text[:200]}"
    version = answer.json().get("version")
    return int(version) if version is not None else None


async def stable_endpoints(stack: Stack, model: str) -> dict[str, str]:
    """Stage -> the model's stable endpoint there (one gateway runtime per stage)."""
    return {t.stage: t.endpoint for t in await traffic.read_traffic(stack.pool, model=model)}


async def wait_state(
    stack: Stack, deployment_id: str, state: DeploymentState, timeout: float = 60
) -> Deployment:
    """Poll the inventory until a deployment is in ``state``."""
    deadline = asyncio.get_running_loop().time() + timeout
    found = None
    while asyncio.get_running_loop().time() < deadline:
        found = await deployments.read_deployment(stack.pool, deployment_id)
        if found is not None and found.state is state:
            return found
        await asyncio.sleep(0.3)
    raise AssertionError(f"{deployment_id} did not become {state.value}: {found}")


async def stop(*handles: WorkflowHandle[Any, Any]) -> None:
    """Terminate runs a test leaves waiting."""
    for handle in handles:
        try:
            await handle.terminate("test over")
        except Exception:  # noqa: BLE001 - already finished
            pass


# --- promotion through every stage ------------------------------------------------------


async def test_endpoint_unchanged_across_promotions_in_every_stage(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    await stack.add_local_runtimes(gateway=True)
    v1, v2 = await stack.register_versions(example_package, tmp_path, 2)
    stages = ("DEV", "SIT", "UAT", "PROD")
    for snap in (v1, v2):
        handle = await stack.start(snap, spec=spec(*stages, gate_last=False))
        for stage in stages[:-1]:
            await wait_for_gate(handle, stage)
            await approve(stack, snap, stage)
        await handle.result()
        if snap is v1:
            first = await stable_endpoints(stack, snap.model)
            assert set(first) == set(stages)
            direct = {
                d.stage: d.endpoint for d in await deployments.read_deployments(stack.pool, model=v1.model)
            }
    assert await stable_endpoints(stack, v1.model) == first, "the stable endpoints never change"
    for stage in stages:
        assert first[stage].endswith(f"/models/{v1.model}")
        assert await answering_version(first[stage]) == v2.version, f"v2 answers {stage}'s endpoint"

    # v1 answered nothing any more and its run had ended: retired at once (grace 0) by the reconcilers
    old = [d for d in await deployments.read_deployments(stack.pool, model=v1.model, live_only=False)]
    for d in old:
        if d.version == v1.version:
            await wait_state(stack, d.id, DeploymentState.RETIRED)
    live = await deployments.read_deployments(stack.pool, model=v1.model)
    assert {(d.stage, d.version) for d in live} == {(s, v2.version) for s in stages}
    assert all(d.endpoint != direct[d.stage] for d in live), "direct endpoints may change, the stable one not"

    # the audit trail: one traffic entry per change, with cause and actor
    entries = await trail.read_entries(stack.pool, kinds=(trail.TRAFFIC,), model=v1.model)
    assert [(e.version, e.data()["stage"]) for e in entries] == [(v, s) for v in (1, 2) for s in stages]
    assert all(e.data()["cause"] == "promote" and e.data()["actor"] for e in entries)
    prod = [e.data() for e in entries if e.data()["stage"] == "PROD"]
    assert [r["version"] for r in prod[1]["routes"]] == [v2.version]
    assert [r["version"] for r in prod[1]["previous"]] == [v1.version]

    # mlc history MODEL --stage PROD: what served when
    shown = await stack.mlc("history", v1.model, "--stage", "PROD", "--json")
    assert shown.returncode == 0, shown.stderr
    history = json.loads(shown.stdout)
    assert [h["versions"] for h in history] == [f"v{v1.version} 100%", f"v{v2.version} 100%"]
    assert all(h["cause"] == "promote" and h["actor"] and h["when"] for h in history)
    table = await stack.mlc("history", v1.model, "--stage", "PROD")
    assert table.returncode == 0 and "promote" in table.stdout, table.stderr

    # mlc deployments: per stable endpoint, which versions take which share
    listed = await stack.mlc("deployments", "--endpoints", "--json")
    assert listed.returncode == 0, listed.stderr
    endpoints = {e["stage"]: e for e in json.loads(listed.stdout)}
    assert {s: e["endpoint"] for s, e in endpoints.items()} == first
    assert all(e["shares"] == {f"v{v2.version}": 100} for e in endpoints.values())
    rows = json.loads((await stack.mlc("deployments", "--json")).stdout)
    assert {(r["stage"], r["version"], r["share"]) for r in rows} == {(s, v2.version, 100) for s in stages}
    assert all(r["stable_endpoint"] == first[r["stage"]] for r in rows)
    human = await stack.mlc("deployments")
    assert "Stable endpoints" in human.stdout and f"v{v2.version} 100%" in human.stdout, human.stdout


async def test_previous_version_stays_warm_for_the_grace(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    await stack.add_local_runtimes(("PROD",), gateway=True)
    await _unprotect_prod(stack)
    v1, v2 = await stack.register_versions(example_package, tmp_path, 2)
    prod = spec("PROD", gate_last=False, grace=timedelta(hours=1))
    await (await stack.start(v1, spec=prod)).result()
    (old,) = await deployments.read_deployments(stack.pool, model=v1.model, stage="PROD")
    second = await stack.start(v2, spec=prod)
    await second.result()
    await keep_history(second, "ModelLifecycle", "blue_green_promotion")
    (endpoint,) = (await stable_endpoints(stack, v1.model)).values()
    assert await answering_version(endpoint) == v2.version
    standby = await deployments.read_deployment(stack.pool, old.id)
    assert standby is not None and standby.state is DeploymentState.SERVING, "v1 stays warm"
    assert standby.details.get(RETIRE_AFTER), "with the time it retires"
    assert (await call_model(old.endpoint, "/health")).status_code == 200
    rows = json.loads((await stack.mlc("deployments", "--json")).stdout)
    assert {r["version"]: (r["share"], bool(r["standby_until"])) for r in rows} == {
        v1.version: (0, True),
        v2.version: (100, False),
    }

    # a program of another user holding the port while the gateway is down: shown as down
    (listed,) = json.loads((await stack.mlc("deployments", "--endpoints", "--json")).stdout)
    assert listed["gateway"] == "up", listed
    runtime = await runtimes.read_runtime(stack.pool, listed["runtime"])
    assert runtime is not None and runtime.gateway is not None
    gateway = LocalGateway(stack.settings, runtime)
    await gateway.stop()
    squatter = await asyncio.create_subprocess_exec(
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
        "/usr/bin/python3", "-c", SQUATTER, str(runtime.gateway.port), "0", runtime.name, cwd="/",
    )  # fmt: skip
    try:
        await asyncio.sleep(1.0)
        (listed,) = json.loads((await stack.mlc("deployments", "--endpoints", "--json")).stdout)
        held = f"down: port {runtime.gateway.port} of the gateway of runtime {runtime.name} is held by "
        assert listed["gateway"].startswith(f"{held}pid {squatter.pid} (python3, user nobody)"), listed
        human = await stack.mlc("deployments")
        assert "down: port" in human.stdout, human.stdout
    finally:
        squatter.kill()
        await squatter.wait()


# --- versions in flight at once ---------------------------------------------------------


async def test_two_versions_in_flight_keep_their_own_deployments(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    await stack.add_local_runtimes(("DEV", "SIT"), gateway=True)
    v1, v2 = await stack.register_versions(example_package, tmp_path, 2)
    two = spec("DEV", "SIT")
    h1, h2 = await stack.start(v1, spec=two), await stack.start(v2, spec=two)
    try:
        await wait_for_gate(h1, "DEV")
        await wait_for_gate(h2, "DEV")
        await approve(stack, v2, "DEV")  # v2 first
        await wait_for_gate(h2, "SIT")
        endpoint = (await stable_endpoints(stack, v1.model))["DEV"]
        assert await answering_version(endpoint) == v2.version

        # v1 still waits at its DEV gate on its own deployment, which still serves
        status = await read_status(h1)
        assert status is not None and status.pending_gate is not None and status.pending_gate.stage == "DEV"
        (mine,) = [d for d in status.deployments if d.stage == "DEV"]
        found = await deployments.read_deployment(stack.pool, mine.id)
        assert found is not None and found.state is DeploymentState.SERVING
        assert (await call_model(found.endpoint, "/health")).json()["version"] == str(v1.version)

        # approving v1 moves the endpoint to v1 and does not take v2 (still in flight) down
        await approve(stack, v1, "DEV")
        await wait_for_gate(h1, "SIT")
        assert await answering_version(endpoint) == v1.version
        v2_dev = next(
            d
            for d in await deployments.read_deployments(
                stack.pool, model=v2.model, stage="DEV", live_only=False
            )
            if d.version == v2.version
        )
        assert v2_dev.state is DeploymentState.SERVING, "v2's lifecycle still runs: its deployment stays"
        status2 = await read_status(h2)
        assert (
            status2 is not None and status2.pending_gate is not None and status2.pending_gate.stage == "SIT"
        )
    finally:
        await stop(h1, h2)


async def test_ten_versions_in_flight(stack: Stack, example_package: Path, tmp_path: Path) -> None:
    await stack.add_local_runtimes(("DEV",), gateway=True)
    snaps = await stack.register_versions(example_package, tmp_path, 10)
    dev = spec("DEV")
    handles = [await stack.start(s, spec=dev) for s in snaps]
    try:
        await asyncio.gather(*(wait_for_gate(h, "DEV") for h in handles))
        waiting = dict(zip((s.version for s in snaps), handles, strict=True))
        own = {s.version: await _dev_deployment(stack, s) for s in snaps}
        order = [snaps[i] for i in (3, 0, 9, 5, 1, 8, 2, 7, 4, 6)]
        endpoint = None
        for snap in order:
            await approve(stack, snap, "DEV")
            await waiting.pop(snap.version).result()
            endpoint = endpoint or (await stable_endpoints(stack, snap.model))["DEV"]
            assert await answering_version(endpoint) == snap.version
            for version, handle in waiting.items():  # the others still wait, on deployments that serve
                status = await read_status(handle)
                assert status is not None and status.pending_gate is not None, version
                found = await deployments.read_deployment(stack.pool, own[version])
                assert found is not None and found.state is DeploymentState.SERVING, version
        assert endpoint == (await stable_endpoints(stack, snaps[0].model))["DEV"]
        entries = await trail.read_entries(stack.pool, kinds=(trail.TRAFFIC,), model=snaps[0].model)
        assert [e.version for e in entries] == [s.version for s in order]
        # every run has ended: only the version answering the endpoint keeps serving
        for snap in order[:-1]:
            await wait_state(stack, own[snap.version], DeploymentState.RETIRED)
        live = await deployments.read_deployments(stack.pool, model=snaps[0].model)
        assert [d.version for d in live] == [order[-1].version]
    finally:
        await stop(*handles)


async def test_twenty_versions_promoted_at_once(stack: Stack, example_package: Path, tmp_path: Path) -> None:
    """Twenty runs of one model approved at DEV together: twenty traffic changes of one
    endpoint queue behind each other, none fails for waiting its turn, each is recorded
    with its own run, and the endpoint answers with the newest decision, as the table says."""
    await stack.add_local_runtimes(("DEV",), gateway=True)
    snaps = await stack.register_versions(example_package, tmp_path, 20)
    handles = [await stack.start(s, spec=spec("DEV")) for s in snaps]
    try:
        begun = asyncio.get_running_loop().time()
        await asyncio.gather(*(wait_for_gate(h, "DEV") for h in handles))
        started = asyncio.get_running_loop().time()
        print(f"20 runs at the DEV gate: {started - begun:.1f} s")
        await asyncio.gather(*(approve(stack, s, "DEV") for s in snaps))
        results = await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} of 20 runs failed: {failed[0]!r}"
        print(f"20 approvals -> 20 runs done: {asyncio.get_running_loop().time() - started:.1f} s")

        table = await traffic.read_one(stack.pool, "local-dev", snaps[0].model)
        assert table is not None and table.decided_at is not None
        (live,) = table.routes
        assert await answering_version(table.endpoint) == live.version, "the gateway serves the table"
        entries = [e.data() | {"run": e.run_id} for e in await trail.read_entries(
            stack.pool, kinds=(trail.TRAFFIC,), model=snaps[0].model
        )]  # fmt: skip
        assert sorted(r["version"] for e in entries for r in e["routes"]) == [s.version for s in snaps]
        assert len({e["run"] for e in entries}) == 20 and all(e["actor"] for e in entries)
        newest = max(entries, key=lambda e: datetime.fromisoformat(e["decided"]))
        assert newest["run"] == table.run_id and newest["routes"][0]["version"] == live.version
        assert "superseded_by" not in newest, "the newest decision is the one live"
        print(f"recorded as superseded: {sum('superseded_by' in e for e in entries)} of 20")
        for entry in entries:  # a change replaced before it was recorded names what replaced it
            replaced = entry.get("superseded_by")
            if replaced is not None:
                assert datetime.fromisoformat(replaced["decided"]) > datetime.fromisoformat(entry["decided"])
                assert replaced["run_id"] != entry["run"], entry
    finally:
        await stop(*handles)


async def test_a_change_recorded_after_a_newer_one_leaves_the_table(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    """Two runs' changes of one endpoint recorded in the opposite order they were decided
    (authorized): the table keeps the newer one, the live version gets no retirement mark
    from the older, and the older is in the trail, superseded by the newer's run."""
    await stack.add_local_runtimes(("DEV",), gateway=True)
    v1, v2 = await stack.register_versions(example_package, tmp_path, 2)
    handles = {
        v1.version: await stack.start(v1, spec=spec("DEV")),
        v2.version: await stack.start(v2, spec=spec("DEV")),
    }
    try:
        assert stack.worker_pool is not None
        inventory = TrafficInventory(stack.worker_pool, stack.settings)
        runtime = await runtimes.read_runtime(stack.pool, "local-dev")
        assert runtime is not None and runtime.gateway is not None
        envs, routes, granted, run_ids = {}, {}, {}, {}
        for snap in (v1, v2):  # v1's change is decided first
            handle = handles[snap.version]
            await wait_for_gate(handle, "DEV")
            run_ids[snap.version] = (await handle.describe()).run_id
            env = ActivityEnvironment(client=stack.client)
            env.info = dataclasses.replace(
                env.info,
                workflow_id=handle.id,
                workflow_run_id=run_ids[snap.version],
                workflow_type="ModelLifecycle",
            )
            routes[snap.version] = (
                TrafficRoute(deployment_id=await _dev_deployment(stack, snap), version=snap.version),
            )
            granted[snap.version] = await env.run(
                inventory.authorize_traffic,
                AuthorizeTrafficInput(stage="DEV", runtime="local-dev", routes=routes[snap.version]),
            )
            envs[snap.version] = env

        def record(version: int, routed: int) -> Any:
            return envs[version].run(
                inventory.record_traffic,
                RecordTrafficInput(
                    stage="DEV",
                    runtime="local-dev",
                    routes=routes[routed],
                    endpoint=runtime.gateway.endpoint(v1.model),  # type: ignore[union-attr]
                    cause="promote",
                    grant=granted[routed].grant,
                ),
            )

        await record(v2.version, v2.version)
        await record(v1.version, v1.version)
        table = await traffic.read_one(stack.pool, "local-dev", v1.model)
        assert (
            table is not None and table.routes == routes[v2.version] and table.run_id == run_ids[v2.version]
        )
        entries = [
            e.data() for e in await trail.read_entries(stack.pool, kinds=(trail.TRAFFIC,), model=v1.model)
        ]
        assert [e["routes"][0]["version"] for e in entries] == [v2.version, v1.version]
        assert "superseded_by" not in entries[0]
        assert entries[1]["superseded_by"]["run_id"] == run_ids[v2.version]
        assert entries[1]["superseded_by"]["shares"] == f"v{v2.version} 100%"
        live = await deployments.read_deployment(stack.pool, routes[v2.version][0].deployment_id)
        assert live is not None and live.details.get(RETIRE_AFTER) is None, "the older change marks nothing"

        # the grant sent with a record must be the run's own
        with pytest.raises(ApplicationError, match="another lifecycle run"):
            await record(v1.version, v2.version)
    finally:
        await stop(*handles.values())


async def _dev_deployment(stack: Stack, snap: ModelSnapshot) -> str:
    found = await deployments.read_deployments(stack.pool, model=snap.model, stage="DEV")
    (mine,) = [d for d in found if d.version == snap.version and d.runtime == "local-dev"]
    return mine.id


async def _unprotect_prod(stack: Stack) -> None:
    from cli import admin
    from mlc.trust.policy import StagePolicy
    from tests.conftest import ADMIN

    await admin.set_policy(stack.pool, stack.settings, stack.signers[ADMIN], StagePolicy(stage="PROD"))


# --- a hostile authorization request ----------------------------------------------------


async def test_hostile_traffic_requests_are_refused(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    await stack.add_local_runtimes(("DEV",), gateway=True)
    # two more DEV runtimes the lifecycles do not deploy to (another service tag)
    other_dev = await stack.add_runtime(
        Runtime(
            name="other-dev",
            stage="DEV",
            service_tags=("elsewhere",),
            task_queue=stack.task_queue,
            gateway=gateway_settings(),
        )
    )
    plain = await stack.add_runtime(
        Runtime(name="plain-dev", stage="DEV", service_tags=("elsewhere",), task_queue=stack.task_queue)
    )
    v1, v2 = await stack.register_versions(example_package, tmp_path, 2)
    other_model = tmp_path / "other-model"
    shutil.copytree(example_package, other_model)
    manifest = other_model / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("name: cc-fraud", "name: other-model", 1))
    stranger = await stack.register(other_model)
    assert stranger.model == "other-model"

    h1 = await stack.start(v1, spec=spec("DEV"))
    h2 = await stack.start(v2, spec=spec("DEV"))
    try:
        await wait_for_gate(h1, "DEV")
        await wait_for_gate(h2, "DEV")
        mine = await deployments.read_deployment(stack.pool, await _dev_deployment(stack, v1))
        theirs = await deployments.read_deployment(stack.pool, await _dev_deployment(stack, v2))
        assert mine is not None and theirs is not None
        fakes = {
            "model": mine.model_copy(
                update={"id": "other-model-v1-dev-x", "model": "other-model", "version": 1}
            ),
            "runtime": mine.model_copy(
                update={"id": "cc-fraud-v1-dev-other-dev-x", "runtime": other_dev.name}
            ),
        }
        for fake in fakes.values():
            await deployments.upsert_deployment(stack.pool, fake)

        run_id = h1.result_run_id or (await h1.describe()).run_id
        info = dataclasses.replace(
            ActivityEnvironment().info,
            workflow_id=h1.id,
            workflow_run_id=run_id,
            workflow_type="ModelLifecycle",
        )
        env = ActivityEnvironment(client=stack.client)
        env.info = info
        assert stack.worker_pool is not None
        activities = TrafficInventory(stack.worker_pool, stack.settings)

        async def authorize(runtime: str, *routes: TrafficRoute, stage: str = "DEV") -> grants.RuntimeGrant:
            result = await env.run(
                activities.authorize_traffic,
                AuthorizeTrafficInput(stage=stage, runtime=runtime, routes=routes),
            )
            public = grants.platform_public_key(stack.settings.platform_key_path)
            return grants.check(result.grant, public, action="route_traffic", run_id=run_id)

        def route(d: Deployment, weight: int = 100, **changes: Any) -> TrafficRoute:
            return TrafficRoute(**{"deployment_id": d.id, "version": d.version, "weight": weight, **changes})

        granted = await authorize("local-dev", route(mine))
        assert granted.model == v1.model and granted.routes == (route(mine),)
        assert granted.runtime.gateway is not None and granted.stage == "DEV"

        refused = {
            "another model's deployment": ("local-dev", (route(fakes["model"]),), "not cc-fraud"),
            "another runtime's deployment": (
                "local-dev",
                (route(fakes["runtime"]),),
                "runs on runtime other-dev",
            ),
            "a path as id": (
                "local-dev",
                (TrafficRoute(deployment_id="../../etc", version=1),),
                "is not valid",
            ),
            "weights not summing to 100": ("local-dev", (route(mine, 60),), "sum to 60"),
            "another run's version not answering now": (
                "local-dev",
                (route(mine, 50), route(theirs, 50)),
                "belongs to another run",
            ),
            "a wrong version": ("local-dev", (route(mine, version=7),), "not version 7"),
            "a runtime without gateway": (plain.name, (route(mine),), "has no gateway"),
            "an unregistered runtime": ("nowhere", (route(mine),), "not registered"),
        }
        for what, (runtime, routes, message) in refused.items():
            with pytest.raises(ApplicationError) as failure:
                await authorize(runtime, *routes)
            assert message in str(failure.value), f"{what}: {failure.value}"
            assert failure.value.type == "RefusedError", what
        with pytest.raises(ApplicationError, match="serves stage DEV, not SIT"):
            await authorize("local-dev", route(mine), stage="SIT")

        # recording checks the routes again: the table never says more than was allowed
        with pytest.raises(ApplicationError, match="belongs to another run"):
            await env.run(
                activities.record_traffic,
                RecordTrafficInput(
                    stage="DEV",
                    runtime="local-dev",
                    routes=(route(theirs),),
                    endpoint="http://x",
                    cause="hostile",
                ),
            )
        assert await traffic.read_traffic(stack.pool, model=v1.model) == []
        assert await trail.read_entries(stack.pool, kinds=(trail.TRAFFIC,)) == []
    finally:
        await stop(h1, h2)


async def test_a_recorded_change_never_applied_is_applied_by_the_reconciler(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    """Workflow code that records routes without applying them (skipping the route step)
    leaves the trail and the gateway apart only until the runtime's reconciler repairs it:
    the table is newer than what the gateway holds, so the gateway takes it."""
    await stack.add_local_runtimes(("DEV",), gateway=True)
    v1, v2 = await stack.register_versions(example_package, tmp_path, 2)
    await (await stack.start(v1, spec=spec("DEV", gate_last=False))).result()
    (table,) = await traffic.read_traffic(stack.pool, model=v1.model)
    assert await answering_version(table.endpoint) == v1.version
    h2 = await stack.start(v2, spec=spec("DEV"))
    try:
        await wait_for_gate(h2, "DEV")
        theirs = await deployments.read_deployment(stack.pool, await _dev_deployment(stack, v2))
        assert theirs is not None
        env = ActivityEnvironment(client=stack.client)
        env.info = dataclasses.replace(
            env.info,
            workflow_id=h2.id,
            workflow_run_id=(await h2.describe()).run_id,
            workflow_type="ModelLifecycle",
        )
        assert stack.worker_pool is not None
        routes = (TrafficRoute(deployment_id=theirs.id, version=v2.version),)
        await env.run(
            TrafficInventory(stack.worker_pool, stack.settings).record_traffic,
            RecordTrafficInput(
                stage="DEV", runtime="local-dev", routes=routes, endpoint=table.endpoint, cause="skipped"
            ),
        )
        assert await answering_version(table.endpoint) == v1.version, "nothing applied it yet"
        await ensure_reconciler(stack.client, stack.settings, stack.worker_pool, "local-dev")
        for _ in range(100):
            if await answering_version(table.endpoint) == v2.version:
                break
            await asyncio.sleep(0.2)
        assert await answering_version(table.endpoint) == v2.version
    finally:
        await stop(h2)


# --- docker -----------------------------------------------------------------------------


async def test_docker_endpoint_unchanged_across_promotions(
    stack: Stack, example_package: Path, tmp_path: Path, docker_engine: Any
) -> None:
    await stack.add_runtime(
        Runtime(
            name="docker-prod",
            kind=RuntimeKind.DOCKER,
            stage="PROD",
            task_queue=stack.task_queue,
            docker=DockerSettings(base_image=DOCKER_BASE_IMAGE, network_mode="host", memory="512m"),
            gateway=gateway_settings(),
        )
    )
    await _unprotect_prod(stack)
    v1, v2 = await stack.register_versions(example_package, tmp_path, 2)
    prod = spec("PROD", gate_last=False)
    await (await stack.start(v1, spec=prod)).result()
    (endpoint,) = (await stable_endpoints(stack, v1.model)).values()
    assert await answering_version(endpoint) == v1.version
    await (await stack.start(v2, spec=prod)).result()
    assert list((await stable_endpoints(stack, v1.model)).values()) == [endpoint]
    assert await answering_version(endpoint) == v2.version
    (old,) = [
        d
        for d in await deployments.read_deployments(stack.pool, model=v1.model, live_only=False)
        if d.version == v1.version
    ]
    await wait_state(stack, old.id, DeploymentState.RETIRED, timeout=120)


# --- the CLI ------------------------------------------------------------------------------


async def test_runtime_add_picks_and_keeps_a_gateway_port(stack: Stack) -> None:
    from mlc.store import runtimes
    from tests.conftest import ADMIN

    added = await stack.mlc("runtime", "add", "edge-dev", "--stage", "DEV", user=ADMIN)
    assert added.returncode == 0, added.stderr
    assert "stable endpoints: http://127.0.0.1:" in added.stdout
    picked = (await runtimes.read_runtime(stack.pool, "edge-dev")).gateway
    assert picked is not None and 20000 <= picked.port < 30000
    port = picked.port + 1 if picked.port < 29999 else picked.port - 1
    fixed = await stack.mlc(
        "runtime", "add", "fixed-dev", "--stage", "DEV", "--gateway-port", str(port), user=ADMIN
    )
    assert fixed.returncode == 0, fixed.stderr
    assert (await runtimes.read_runtime(stack.pool, "fixed-dev")).gateway == GatewaySettings(port=port)
    taken = await stack.mlc(
        "runtime", "add", "twin-dev", "--stage", "DEV", "--gateway-port", str(port), user=ADMIN
    )
    assert taken.returncode != 0 and "another runtime's" in taken.stderr + taken.stdout
    plain = await stack.mlc("runtime", "add", "plain-dev", "--stage", "DEV", "--no-gateway", user=ADMIN)
    assert plain.returncode == 0, plain.stderr
    assert (await runtimes.read_runtime(stack.pool, "plain-dev")).gateway is None

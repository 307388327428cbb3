"""Contracts of the runtime activities, served on each runtime's task queue.

Their only input is a grant the platform signed (see :mod:`mlc.trust.grants`): the
runtime worker takes the deployment, runtime and snapshot from the grant and asks its
driver where the deployment listens or wrote its output, never the payload. The requests
each activity then hands its runtime's driver (:class:`OnlineDeployRequest`...) are here
too, next to the activity they serve.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import Field

from mlc.contracts.base import ActivityContract
from mlc.domain import Deployment, Frozen, ModelSnapshot, Runtime, TestKind, TestResult
from mlc.statements import Envelope

DEPLOY_TIMEOUT = timedelta(minutes=30)
"""Generous: a first docker deployment builds an image; heartbeats catch a dead worker."""
TEST_TIMEOUT = timedelta(minutes=15)
UNDEPLOY_TIMEOUT = timedelta(minutes=2)
HEARTBEAT_TIMEOUT = timedelta(seconds=20)
"""How soon an activity whose worker died (``kill -9``, a lost host) is retried elsewhere.
Every runtime activity heartbeats at least every 5 s while it works."""


class RuntimeActionInput(Frozen):
    """A runtime activity's only input: the platform's grant, which names everything it acts on."""

    grant: Envelope


class OnlineDeployRequest(Frozen):
    """Bring up a persistent scoring endpoint for a snapshot on a runtime."""

    deployment_id: str
    snapshot: ModelSnapshot
    runtime: Runtime
    stage: str


class BatchJobRequest(Frozen):
    """Score a JSON-lines dataset with an ephemeral job, leaving nothing running."""

    deployment_id: str
    snapshot: ModelSnapshot
    runtime: Runtime
    stage: str
    input_path: str | None = None
    """JSON-lines input on the runtime's host; None scores the package's test dataset."""


class StreamingDeployRequest(Frozen):
    """Start (or keep) the long-running consumers of a streaming deployment."""

    deployment_id: str
    snapshot: ModelSnapshot
    runtime: Runtime
    stage: str
    standby: bool = False
    """Score only the deployment's test topics: an older version of the model still owns
    the runtime's input topic until this one is promoted."""


class UndeployRequest(Frozen):
    """Remove a deployment from its runtime (a no-op when it is already gone)."""

    deployment_id: str
    runtime: Runtime


class RunStageTestsInput(Frozen):
    """Which tests to run against one deployment of one snapshot in a stage."""

    stage: str
    snapshot: ModelSnapshot
    deployment: Deployment
    tests: tuple[TestKind, ...]
    batch_output: str | None = None
    """For batch deployments: the job's JSON-lines output (samples first, then evaluation).
    Informative only: the activity reads the output its runtime's driver locates."""
    grant: Envelope | None = None
    """The platform's grant to test this deployment (from ``record_deployment``); the
    activity takes the deployment, runtime and snapshot from it, not from the fields above."""
    max_auc_drop: float = Field(default=0.01, ge=0, le=1)
    """``champion_challenger``: the stage spec's allowed AUC drop of the challenger."""
    champion: Deployment | None = None
    """``champion_challenger``: the champion, set by the activity from the grant's routes (the
    inventory chose it); a value sent by workflow code is ignored."""


class RunStageTestsResult(Frozen):
    """One result per requested test, in the requested order; failures are results too."""

    results: tuple[TestResult, ...]
    evidence: Envelope | None = None
    """``results`` signed by the runtime's evidence key (:mod:`mlc.trust.evidence`); the
    inventory records no result without it."""


class OnlineDeployResult(Frozen):
    """Where the endpoint listens, plus driver facts worth recording (pid, container id)."""

    endpoint: str
    details: dict[str, Any] = Field(default_factory=dict)
    evidence: Envelope | None = None
    """The result signed by the runtime's evidence key (:mod:`mlc.trust.evidence`); the
    inventory records nothing without it."""


class BatchJobResult(Frozen):
    """What the job did: where the output is, how many records, how long."""

    output_path: str
    records: int
    seconds: float
    details: dict[str, Any] = Field(default_factory=dict)
    evidence: Envelope | None = None
    """The result signed by the runtime's evidence key (:mod:`mlc.trust.evidence`); the
    inventory records nothing without it."""


class StreamingDeployResult(Frozen):
    """Where a streaming deployment reads (``kafka://BROKERS/TOPIC``), plus its topics,
    consumer group and the driver's facts (pids, containers)."""

    endpoint: str
    details: dict[str, Any] = Field(default_factory=dict)
    evidence: Envelope | None = None
    """The result signed by the runtime's evidence key (:mod:`mlc.trust.evidence`); the
    inventory records nothing without it."""


DEPLOY_ONLINE = ActivityContract(
    "deploy_online", RuntimeActionInput, OnlineDeployResult, DEPLOY_TIMEOUT, HEARTBEAT_TIMEOUT
)
RUN_BATCH_JOB = ActivityContract(
    "run_batch_job", RuntimeActionInput, BatchJobResult, DEPLOY_TIMEOUT, HEARTBEAT_TIMEOUT
)
DEPLOY_STREAMING = ActivityContract(
    "deploy_streaming", RuntimeActionInput, StreamingDeployResult, DEPLOY_TIMEOUT, HEARTBEAT_TIMEOUT
)
UNDEPLOY = ActivityContract("undeploy", RuntimeActionInput, type(None), UNDEPLOY_TIMEOUT, HEARTBEAT_TIMEOUT)
RUN_STAGE_TESTS = ActivityContract(
    "run_stage_tests", RunStageTestsInput, RunStageTestsResult, TEST_TIMEOUT, HEARTBEAT_TIMEOUT
)

CONTRACTS = (DEPLOY_ONLINE, RUN_BATCH_JOB, DEPLOY_STREAMING, UNDEPLOY, RUN_STAGE_TESTS)
"""Every runtime activity: what each runtime's task queue must serve."""

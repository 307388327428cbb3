"""Contracts of the runtime activities, served on each runtime's task queue.

Their only input is a grant the platform signed (see :mod:`mlc.trust.grants`): the
runtime worker takes the deployment, runtime and snapshot from the grant and asks its
driver where the deployment listens or wrote its output, never the payload.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import Field

from mlc import names
from mlc.contracts.base import ActivityContract
from mlc.domain import Frozen
from mlc.payloads import RuntimeActionInput
from mlc.test_payloads import RunStageTestsInput, RunStageTestsResult
from mlc.trust.statements import Envelope

DEPLOY_TIMEOUT = timedelta(minutes=30)
"""Generous: a first docker deployment builds an image; heartbeats catch a dead worker."""
TEST_TIMEOUT = timedelta(minutes=15)
UNDEPLOY_TIMEOUT = timedelta(minutes=2)
HEARTBEAT_TIMEOUT = timedelta(seconds=20)
"""How soon an activity whose worker died (``kill -9``, a lost host) is retried elsewhere.
Every runtime activity heartbeats at least every 5 s while it works."""


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
    names.DEPLOY_ONLINE, RuntimeActionInput, OnlineDeployResult, DEPLOY_TIMEOUT, HEARTBEAT_TIMEOUT
)
RUN_BATCH_JOB = ActivityContract(
    names.RUN_BATCH_JOB, RuntimeActionInput, BatchJobResult, DEPLOY_TIMEOUT, HEARTBEAT_TIMEOUT
)
DEPLOY_STREAMING = ActivityContract(
    names.DEPLOY_STREAMING, RuntimeActionInput, StreamingDeployResult, DEPLOY_TIMEOUT, HEARTBEAT_TIMEOUT
)
UNDEPLOY = ActivityContract(
    names.UNDEPLOY, RuntimeActionInput, type(None), UNDEPLOY_TIMEOUT, HEARTBEAT_TIMEOUT
)
RUN_STAGE_TESTS = ActivityContract(
    names.RUN_STAGE_TESTS, RunStageTestsInput, RunStageTestsResult, TEST_TIMEOUT, HEARTBEAT_TIMEOUT
)

CONTRACTS = (DEPLOY_ONLINE, RUN_BATCH_JOB, DEPLOY_STREAMING, UNDEPLOY, RUN_STAGE_TESTS)
"""Every runtime activity: what each runtime's task queue must serve."""

"""Contracts of the inventory activities, served only by the trusted main worker.

They run on the main task queue; workflow code (uploaded lifecycles included) reaches
the inventory only through them, and they derive the run from Temporal's activity info.
"""

from __future__ import annotations

from datetime import timedelta

from mlc import names
from mlc.contracts.base import ActivityContract
from mlc.payloads import (
    AuthorizeDeploymentInput,
    AuthorizeDeploymentResult,
    AuthorizeUndeployInput,
    BeginRunInput,
    BeginRunResult,
    FindDeploymentsInput,
    FindDeploymentsResult,
    LoadLifecycleInput,
    LoadLifecycleResult,
    NotifyInput,
    RecordDecisionInput,
    RecordDeploymentInput,
    RecordDeploymentResult,
    RecordRunInput,
    RecordTestsInput,
    RecordTestsResult,
    ResolveApproversInput,
    ResolveApproversResult,
    ResolveRuntimesInput,
    ResolveRuntimesResult,
    RuntimeGrantResult,
    VerifyDecisionInput,
    VerifyDecisionResult,
)

INVENTORY_TIMEOUT = timedelta(seconds=30)
"""Database reads and writes: short, retried on transient failures."""

BEGIN_RUN = ActivityContract(names.BEGIN_RUN, BeginRunInput, BeginRunResult, INVENTORY_TIMEOUT)
RECORD_RUN = ActivityContract(names.RECORD_RUN, RecordRunInput, type(None), INVENTORY_TIMEOUT)
RESOLVE_RUNTIMES = ActivityContract(
    names.RESOLVE_RUNTIMES, ResolveRuntimesInput, ResolveRuntimesResult, INVENTORY_TIMEOUT
)
AUTHORIZE_DEPLOYMENT = ActivityContract(
    names.AUTHORIZE_DEPLOYMENT, AuthorizeDeploymentInput, AuthorizeDeploymentResult, INVENTORY_TIMEOUT
)
AUTHORIZE_UNDEPLOY = ActivityContract(
    names.AUTHORIZE_UNDEPLOY, AuthorizeUndeployInput, RuntimeGrantResult, INVENTORY_TIMEOUT
)
VERIFY_DECISION = ActivityContract(
    names.VERIFY_DECISION, VerifyDecisionInput, VerifyDecisionResult, INVENTORY_TIMEOUT
)
RECORD_DEPLOYMENT = ActivityContract(
    names.RECORD_DEPLOYMENT, RecordDeploymentInput, RecordDeploymentResult, INVENTORY_TIMEOUT
)
FIND_DEPLOYMENTS = ActivityContract(
    names.FIND_DEPLOYMENTS, FindDeploymentsInput, FindDeploymentsResult, INVENTORY_TIMEOUT
)
RECORD_TESTS = ActivityContract(names.RECORD_TESTS, RecordTestsInput, RecordTestsResult, INVENTORY_TIMEOUT)
"""Histories from before signed evidence hold no result (None) for it."""
RECORD_DECISION = ActivityContract(names.RECORD_DECISION, RecordDecisionInput, type(None), INVENTORY_TIMEOUT)
RESOLVE_APPROVERS = ActivityContract(
    names.RESOLVE_APPROVERS, ResolveApproversInput, ResolveApproversResult, INVENTORY_TIMEOUT
)
NOTIFY = ActivityContract(names.NOTIFY, NotifyInput, type(None), INVENTORY_TIMEOUT)
LOAD_LIFECYCLE = ActivityContract(
    names.LOAD_LIFECYCLE, LoadLifecycleInput, LoadLifecycleResult, INVENTORY_TIMEOUT
)

CONTRACTS = (
    BEGIN_RUN,
    RECORD_RUN,
    RESOLVE_RUNTIMES,
    AUTHORIZE_DEPLOYMENT,
    AUTHORIZE_UNDEPLOY,
    VERIFY_DECISION,
    RECORD_DEPLOYMENT,
    FIND_DEPLOYMENTS,
    RECORD_TESTS,
    RECORD_DECISION,
    RESOLVE_APPROVERS,
    NOTIFY,
    LOAD_LIFECYCLE,
)
"""Every inventory activity: what the main worker must serve."""

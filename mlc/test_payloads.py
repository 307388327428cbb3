"""Input and result of the ``run_stage_tests`` activity.

Kept apart from ``activities/testing.py`` (which imports httpx) so workflows can import
these models through the sandbox; only pydantic-based domain types are used. The
activity's contract is ``mlc.contracts.runtime.RUN_STAGE_TESTS``.
"""

from __future__ import annotations

from pydantic import Field

from mlc.domain import Deployment, Frozen, ModelSnapshot, TestKind, TestResult
from mlc.trust.statements import Envelope


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

"""Input and result of the ``run_stage_tests`` activity.

Kept apart from ``activities/testing.py`` (which imports httpx) so workflows can import
these models through the sandbox; only pydantic-based domain types are used.
"""

from __future__ import annotations

from mlc.domain import Deployment, Frozen, ModelSnapshot, TestKind, TestResult


class RunStageTestsInput(Frozen):
    """Which tests to run against one deployment of one snapshot in a stage."""

    stage: str
    snapshot: ModelSnapshot
    deployment: Deployment
    tests: tuple[TestKind, ...]
    batch_output: str | None = None
    """For batch deployments: the job's JSON-lines output (samples first, then evaluation)."""


class RunStageTestsResult(Frozen):
    """One result per requested test, in the requested order; failures are results too."""

    results: tuple[TestResult, ...]

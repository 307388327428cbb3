"""The authoring API: the building blocks every lifecycle is written with.

A lifecycle is an ``async def run(mlc: Lifecycle) -> None`` function. The built-in
lifecycles and uploaded ones use exactly this API, so whatever the standard lifecycle
can do, a custom one can too. Everything here runs inside a Temporal workflow: it is
deterministic, and every side effect is an activity on a trusted worker.

This module is what uploaded code imports, so it holds only the names in ``__all__``
(classes, no module objects), and :class:`Lifecycle` is a facade: the documented
operations and read-only views of the run, with no attribute to read or set. The run's
state and plumbing stay in the private :mod:`lifecycles._run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import NoReturn, TypeVar

from pydantic import BaseModel

from lifecycles._rollout import rollout as _rollout
from lifecycles._rollout import shadow as _shadow
from lifecycles._run import LifecycleFailure
from lifecycles._run import cause_message as cause_message  # for workflow code; not in __all__
from lifecycles._run import run_of as _run_of
from mlc.domain import (
    ApprovalGate,
    ApprovalRecord,
    Decision,
    Deployment,
    LifecycleSpec,
    Mode,
    Rollout,
    RolloutStrategy,
    StageSpec,
    StageTestReport,
    TestKind,
)

__all__ = [
    "ApprovalGate",
    "ApprovalRecord",
    "Decision",
    "Deployment",
    "Lifecycle",
    "LifecycleFailure",
    "LifecycleSpec",
    "Mode",
    "Rollout",
    "RolloutStrategy",
    "StageSpec",
    "StageTestReport",
    "TestKind",
]


class Lifecycle:
    """What ``run(mlc)`` receives: one run's operations and where it stands.

    Every member is documented in docs/custom-lifecycles.md; there are no others. The
    object has no instance attributes (``__slots__``), so lifecycle code can neither read
    nor change the run's internals through it.
    """

    __slots__ = ("__weakref__",)

    # --- where the run stands -----------------------------------------------------------

    @property
    def model(self) -> str:
        """The model this run promotes."""
        return _run_of(self).model

    @property
    def version(self) -> int:
        """The snapshot's version."""
        return _run_of(self).version

    @property
    def spec(self) -> LifecycleSpec:
        """This run's stages, tests and gates (the run's own ``spec`` or the lifecycle's)."""
        return _run_of(self).spec

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        """The stages of this run, in promotion order."""
        return _run_of(self).stages

    def report(self, stage: str) -> StageTestReport | None:
        """The latest test report of ``stage``, if its tests ran."""
        found = _run_of(self).report(stage)
        return _copy(found) if found is not None else None

    def deployments(self, stage: str | None = None, *, live: bool = True) -> list[Deployment]:
        """Deployments this run made, optionally of one stage; by default only live ones."""
        return _copies(_run_of(self).deployments(stage, live=live))

    # --- building blocks ----------------------------------------------------------------

    async def deploy(self, stage: str, *, mode: Mode | None = None) -> list[Deployment]:
        """Deploy the snapshot to every runtime of ``stage`` serving its service tags.

        Online deployments return once healthy; batch deployments return once the job
        has scored the test dataset and the runtime is cleared (state ``completed``).
        """
        return _copies(await _run_of(self).deploy(stage, mode=mode))

    async def test(
        self, stage: str, deployments: Sequence[Deployment], *, tests: Sequence[TestKind] | None = None
    ) -> StageTestReport:
        """Run the stage's tests (or ``tests``) against each of this run's ``deployments``.

        The report is recorded in the audit trail and returned as recorded: each result
        counts only as its runtime signed it (a passing result no runtime signed comes back
        failed, ``refused: ...``); a deployment this run did not make is refused (ValueError).
        """
        return _copy(await _run_of(self).test(stage, deployments, tests=tests))

    async def approval(self, stage: str) -> ApprovalRecord:
        """Open ``stage``'s gate and wait for a decision (approved, rejected or expired)."""
        return _copy(await _run_of(self).approval(stage))

    async def promote(self, stage: str, deployments: Sequence[Deployment]) -> list[Deployment]:
        """Make ``deployments`` the model's version in ``stage`` (blue/green).

        On a runtime with a gateway the model's stable endpoint sends all traffic to the new
        online deployment and the previous versions stay warm for the stage's ``grace``; on
        one without, the older versions there are retired. Returns the ones retired now.
        """
        return _copies(await _run_of(self).promote(stage, deployments))

    async def rollout(self, stage: str, deployments: Sequence[Deployment]) -> list[Deployment]:
        """Move ``stage``'s live traffic to ``deployments`` as the stage's ``rollout`` says.

        ``blue_green`` (the default) and ``shadow`` promote at once. ``canary`` first gives
        the new version ``steps`` shares of live traffic, each for ``window``, comparing its
        error rate and p99 latency with the current version's; on a breach it routes all
        traffic back, undeploys the new version and fails the run (LifecycleFailure). Every
        traffic change is in the audit trail with its cause. Returns the retired deployments.
        """
        return _copies(await _rollout(_run_of(self), stage, deployments))

    async def shadow(self, stage: str, deployments: Sequence[Deployment]) -> StageTestReport:
        """Mirror live traffic to ``deployments`` for the stage's ``rollout.duration`` and compare.

        Both versions answer the same live requests (the new one's answers are discarded);
        the comparison (pairs, agreement rate, score differences, judged against
        ``min_pairs``, ``min_agreement``, ``max_mean_abs_diff``) joins the stage's test
        report as a ``shadow`` result: evidence for the stage's gate. Returns that report.
        """
        return _copy(await _shadow(_run_of(self), stage, deployments))

    async def undeploy(self, deployments: Sequence[Deployment]) -> None:
        """Take this run's ``deployments`` down and mark them retired."""
        await _run_of(self).undeploy(deployments)

    async def notify(self, message: str) -> None:
        """Tell the people following this lifecycle (stored and logged)."""
        await _run_of(self).notify(message)

    async def sleep(self, duration: timedelta) -> None:
        """A durable timer: survives worker restarts."""
        await _run_of(self).sleep(duration)

    def log(self, message: str) -> None:
        """Write to the worker's log (not repeated on replay)."""
        _run_of(self).log(message)

    def fail(self, reason: str) -> NoReturn:
        """End the run as failed with ``reason`` (shown in the Web UI and the CLI)."""
        raise LifecycleFailure(reason)


_Model = TypeVar("_Model", bound=BaseModel)


def _copy(value: _Model) -> _Model:
    """A deep copy: what lifecycle code gets is its own, never the run's record (whose
    ``details`` dicts it could otherwise change)."""
    return value.model_copy(deep=True)


def _copies(values: list[_Model]) -> list[_Model]:
    return [v.model_copy(deep=True) for v in values]

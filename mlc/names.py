"""Names that are part of the persisted contract: workflows, task queues, search attributes.

Activity names live with their inputs and results in :mod:`mlc.contracts`.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

STANDARD_LIFECYCLE = "ModelLifecycle"
"""The standard lifecycle's workflow type: what people type in the Web UI."""
BATCH_LIFECYCLE = "BatchPromotion"
"""The built-in batch-only promotion's workflow type."""
BUILT_IN_LIFECYCLES = (STANDARD_LIFECYCLE, BATCH_LIFECYCLE)
"""Workflow types served by registered classes; uploaded lifecycles may not take them."""
ROLLBACK = "Rollback"
"""The built-in workflow ``mlc rollback`` starts (main queue): a signed rollback decision puts
a previous version back behind a stage's stable endpoints."""
RUNTIME_RECONCILER = "RuntimeReconciler"
"""The built-in workflow that keeps one runtime's deployments true (one per runtime)."""
BUILT_IN_WORKFLOWS = (*BUILT_IN_LIFECYCLES, ROLLBACK, RUNTIME_RECONCILER)
"""Every workflow type the trusted main worker serves: reserved, uploads may not take them."""

LIFECYCLES_QUEUE_SUFFIX = "-lifecycles"
"""Uploaded lifecycles run on ``<main queue>-lifecycles``, served only by the sandboxed
lifecycle worker (``mlc worker --lifecycles``); their activities run on the main queue."""


def lifecycles_task_queue(main_queue: str) -> str:
    """The queue of uploaded lifecycles for a main queue: ``mlc`` -> ``mlc-lifecycles``."""
    return f"{main_queue}{LIFECYCLES_QUEUE_SUFFIX}"


def main_task_queue(queue: str) -> str:
    """The main queue a workflow's activities go to, from the queue the workflow runs on.

    Workflow code computes it from ``workflow.info().task_queue``: built-in lifecycles run
    on the main queue itself, uploaded ones on its ``-lifecycles`` sibling.
    """
    return queue.removesuffix(LIFECYCLES_QUEUE_SUFFIX)


def lifecycle_task_queue(lifecycle: str, main_queue: str) -> str:
    """Where a run of ``lifecycle`` must be started: built-ins on the main queue, uploads on
    the lifecycles queue."""
    return main_queue if lifecycle in BUILT_IN_LIFECYCLES else lifecycles_task_queue(main_queue)


# Custom search attributes: filter lifecycles in the Web UI.
SA_MODEL = SearchAttributeKey.for_keyword("MlcModel")
SA_VERSION = SearchAttributeKey.for_int("MlcVersion")
SA_STAGE = SearchAttributeKey.for_keyword("MlcStage")
SA_SERVICE_TAG = SearchAttributeKey.for_keyword_list("MlcServiceTag")
SEARCH_ATTRIBUTES = {
    SA_MODEL.name: "Keyword",
    SA_VERSION.name: "Int",
    SA_STAGE.name: "Keyword",
    SA_SERVICE_TAG.name: "KeywordList",
}
"""Name -> type, as ``temporal server start-dev --search-attribute`` takes them."""


def rollback_workflow_id(model: str, stage: str, nonce: str) -> str:
    """The workflow id of one signed rollback (its nonce makes it unique; a second start of
    the same statement finds the first)."""
    return f"rollback-{model}-{stage.lower()}-{nonce[:16]}"


def workflow_id_for(model: str, version: int) -> str:
    """The business-key workflow id of a snapshot's lifecycle (one run at a time)."""
    return f"mlc-{model}-v{version}"

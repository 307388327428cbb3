"""The model server: one ASGI app and one batch job for every model package.

The same code runs as a local process and inside slim containers, so this package
imports only starlette, uvicorn, orjson, pyyaml, pydantic, packaging and ``mlc.manifest``,
``mlc.domain`` and ``mlc.errors`` (never temporalio, asyncpg, docker or httpx); pyarrow
only when a batch job finds it installed (see :mod:`mlc.serving.batch`).
"""

from __future__ import annotations

from mlc.serving.app import DEFAULT_MAX_BATCH, create_app
from mlc.serving.batch import BatchSummary, run_batch
from mlc.serving.limits import ServingLimits
from mlc.serving.model_code import LoadedModel, check_requirements, load_model
from mlc.serving.validation import InvalidRecordsError, Problem, RecordValidator

__all__ = [
    "DEFAULT_MAX_BATCH",
    "BatchSummary",
    "InvalidRecordsError",
    "LoadedModel",
    "Problem",
    "RecordValidator",
    "ServingLimits",
    "check_requirements",
    "create_app",
    "load_model",
    "run_batch",
]

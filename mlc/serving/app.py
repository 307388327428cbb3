"""The scoring HTTP API: ``/health``, ``/metadata``, ``/score`` and ``/metrics``.

Built on bare Starlette endpoints with orjson so a request costs little more than the
model itself: records are checked by a precompiled :class:`RecordValidator`, small
concurrent requests are merged into bounded calls of the model's vectorised
``score_batch`` (:class:`MicroBatcher`, capped by records and time), and big batches run
in a scoring thread so ``/health`` keeps answering while they score. Bodies and arrays
over the server's :class:`ServingLimits` are refused with 413 before they are decoded
(see :mod:`mlc.serving.limits`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mlc.serving.capture import CAPTURE_HEADER, REQUEST_ID_HEADER, AnswerCapture, capture_path
from mlc.serving.limits import (
    DEFAULT_MAX_RECORDS,
    MAX_RECORDS_ENV,
    LimitExceededError,
    ServingLimits,
    read_body,
    too_many_records,
)
from mlc.serving.microbatch import BatchPolicy, MicroBatcher
from mlc.serving.model_code import LoadedModel, Record, load_model
from mlc.serving.validation import Problem, RecordValidator

DEFAULT_MAX_BATCH = DEFAULT_MAX_RECORDS
"""Largest array ``/score`` and ``/metrics`` accept; bigger ones get 413 (use a batch job instead)."""

MAX_PROBLEMS = 100
"""At most this many problems are listed in a 422 (the count of bad records says the rest)."""

VERSION_ENV = "MLC_MODEL_VERSION"
SHA256_ENV = "MLC_SNAPSHOT_SHA256"

_log = logging.getLogger("mlc.serving")
_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class JSONResponse(Response):
    """A response rendered by orjson (numpy scalars and arrays included)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """Serialise ``content``; raises ``orjson.JSONEncodeError`` for non-JSON values."""
        return orjson.dumps(content, option=_DUMPS_OPTIONS)


def _error(status: int, message: str, details: list[Problem] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status)


class _ScoringService:
    """Request handlers bound to one loaded model."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        limits: ServingLimits,
        batching: BatchPolicy,
        identity: tuple[str | None, str | None] | None = None,
        capture: Path | None = None,
    ) -> None:
        """Bind the handlers to ``model``; ``identity`` is its (version, sha256), else the
        ``MLC_MODEL_VERSION`` and ``MLC_SNAPSHOT_SHA256`` variables (one model per process),
        and ``capture`` the file of its captured answers, else :func:`capture_path`."""
        self.model = model
        self.limits = limits
        self.max_batch = limits.max_records
        self.max_body_bytes = limits.max_body_bytes
        self.validator = RecordValidator(model.manifest.input_schema)
        self.batcher = MicroBatcher(model.score_batch, batching) if model.vectorised else None
        self.capture = AnswerCapture(capture or capture_path())
        """Answers to requests the gateway marks with ``X-MLC-Capture`` (shadow comparisons)."""
        manifest = model.manifest
        if identity is None:
            identity = (os.environ.get(VERSION_ENV) or None, os.environ.get(SHA256_ENV) or None)
        version, sha256 = identity
        self.health_body = orjson.dumps(
            {"status": "ok", "model": manifest.name, "version": version, "sha256": sha256}
        )
        self.metadata_body = orjson.dumps(
            {
                "name": manifest.name,
                "description": manifest.description,
                "service_tags": manifest.service_tags,
                "entry_module": manifest.entry_module,
                "requirements": manifest.requirements,
                "input_schema": [f.model_dump() for f in manifest.input_schema],
                "version": version,
                "sha256": sha256,
                "max_batch": self.max_batch,
                "max_body_bytes": self.max_body_bytes,
                "vectorised": model.vectorised,
                "metrics": model.metrics is not None,
            }
        )

    async def health(self, request: Request) -> Response:
        """Liveness and identity: which model (and snapshot) this server runs."""
        return Response(self.health_body, media_type="application/json")

    async def metadata(self, request: Request) -> Response:
        """The manifest facts a client needs to build valid requests."""
        return Response(self.metadata_body, media_type="application/json")

    async def score(self, request: Request) -> Response:
        """Score one record (a JSON object) or many (a JSON array of objects)."""
        payload = await self._read_json(request)
        if isinstance(payload, Response):
            return payload
        name = self.model.name
        if type(payload) is dict:
            problems = self.validator.problems((payload,), limit=MAX_PROBLEMS)
            if problems:
                return _error(422, f"the record does not match the input schema of model {name}", problems)
            try:
                if self.batcher is not None:
                    output = (await self.batcher.submit([payload]))[0]
                else:
                    output = self.model.score(payload)
            except Exception as exc:
                return self._model_failed("score()", exc)
            if type(output) is not dict:
                return _error(500, f"model {name}: score() returned {type(output).__name__}, expected a dict")
            self._capture(request, output)
            return self._render(output)
        if type(payload) is list:
            if len(payload) > self.max_batch:
                return self._too_many(str(len(payload)))
            problems = self.validator.problems(payload, limit=MAX_PROBLEMS)
            if problems:
                bad = len({p["record"] for p in problems})
                return _error(
                    422,
                    f"{'at least ' if len(problems) >= MAX_PROBLEMS else ''}{bad} of {len(payload)} "
                    f"records do not match the input schema of model {name}",
                    problems,
                )
            try:
                outputs = await self._score_many(payload)
            except Exception as exc:
                return self._model_failed("score_batch()", exc)
            if (
                type(outputs) is not list
                or len(outputs) != len(payload)
                or not all(type(o) is dict for o in outputs)
            ):
                return _error(
                    500,
                    f"model {name}: score_batch() must return a list of {len(payload)} dicts, "
                    f"got {_describe(outputs)}",
                )
            self._capture(request, outputs)
            return self._render(outputs)
        return _error(
            400,
            f"expected a JSON object (one record) or an array of records, got {_describe(payload)}",
        )

    def _capture(self, request: Request, output: Any) -> None:
        """Record ``output`` when the gateway asked for it (see :mod:`mlc.serving.capture`)."""
        headers = request.headers
        if headers.get(CAPTURE_HEADER):
            self.capture.record(headers.get(REQUEST_ID_HEADER), output)

    async def metrics(self, request: Request) -> Response:
        """The model's own ``metrics(records)`` over a JSON array of labelled records."""
        if self.model.metrics is None:
            return _error(404, f"model {self.model.name} has no metrics(records) function")
        payload = await self._read_json(request)
        if isinstance(payload, Response):
            return payload
        if type(payload) is not list:
            return _error(400, "expected a JSON array of labelled records")
        if len(payload) > self.max_batch:
            return self._too_many(str(len(payload)))
        if not all(type(r) is dict for r in payload):
            return _error(400, "expected a JSON array of labelled records")
        try:
            result = await run_in_threadpool(self.model.metrics, payload)
        except Exception as exc:
            return self._model_failed("metrics()", exc)
        return self._render(result)

    async def _read_json(self, request: Request) -> Any:
        """The decoded body, or a 400 or 413 response saying why there is none.

        Size limits are checked before decoding: decoded JSON can take twenty times the
        memory of its text.
        """
        try:
            body = await read_body(request, self.max_body_bytes)
        except LimitExceededError as exc:
            return _error(413, str(exc))
        if not body or body.isspace():
            return _error(400, "empty body: send a JSON object (one record) or an array of records")
        if too_many_records(body, self.max_batch):
            return self._too_many(f"more than {self.max_batch}")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return _error(400, f"body is not valid JSON: {exc}")

    def _too_many(self, count: str) -> Response:
        return _error(
            413,
            f"batch of {count} records exceeds this server's limit of {self.max_batch} "
            f"({MAX_RECORDS_ENV}); split it or run a batch job",
        )

    async def _score_many(self, records: list[Record]) -> Any:
        if self.batcher is None:
            return self.model.score_batch(records)
        return await self.batcher.submit(records)

    def _render(self, content: Any) -> Response:
        try:
            return JSONResponse(content)
        except orjson.JSONEncodeError as exc:
            return _error(500, f"model {self.model.name} returned output that is not JSON: {exc}")

    def _model_failed(self, call: str, exc: Exception) -> Response:
        _log.exception("model %s: %s raised", self.model.name, call)
        return _error(500, f"model {self.model.name}: {call} raised {type(exc).__name__}: {exc}")


def _describe(value: Any) -> str:
    if type(value) is list:
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {len(value)} ({', '.join(kinds) or 'empty'})"
    return type(value).__name__


class ScoringApp:
    """The ASGI app of one model: ``POST /score`` straight to its handler, the rest via Starlette.

    Scoring is the one hot path, so it skips Starlette's middleware and route matching
    (measured at about a fifth of a small request's CPU); everything else, and every
    other method or path (404, 405), is Starlette's. An exception escaping the handler
    gets a 500 when nothing was sent yet, then propagates to the server, as Starlette's
    ``ServerErrorMiddleware`` does.
    """

    def __init__(self, service: _ScoringService, routes: list[Route]) -> None:
        self.service = service
        self.starlette = Starlette(routes=routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope."""
        if scope["type"] != "http" or scope["path"] != "/score" or scope["method"] != "POST":
            await self.starlette(scope, receive, send)
            return
        try:
            response = await self.service.score(Request(scope, receive))
        except Exception:
            await _error(500, "Internal Server Error")(scope, receive, send)
            raise
        await response(scope, receive, send)


def create_app(
    package_dir: Path,
    *,
    max_batch: int | None = None,
    max_body_bytes: int | None = None,
    limits: ServingLimits | None = None,
    batching: BatchPolicy | None = None,
) -> ScoringApp:
    """Load the package at ``package_dir`` (calling its ``init()`` once) and return the app.

    Loading happens here, not on startup, so a broken package fails before the server
    binds its port and the process exits with the reason in its log.

    Args:
        package_dir: The unpacked model package.
        max_batch: Largest array of records (default: ``limits``).
        max_body_bytes: Largest request body (default: ``limits``).
        limits: Defaults for both (default: :meth:`ServingLimits.from_env`).
        batching: How far concurrent requests are merged (default: :meth:`BatchPolicy.from_env`).

    Raises:
        InvalidPackageError: bad manifest or missing requirement.
        ScoringError: the model's import or ``init()`` raised.
        MLCError: a ``MLC_SERVING_*`` limit or batching variable is not a positive number.
    """
    base = limits if limits is not None else ServingLimits.from_env()
    overrides = {
        key: value
        for key, value in (("max_records", max_batch), ("max_body_bytes", max_body_bytes))
        if value is not None
    }
    chosen = ServingLimits.model_validate({**base.model_dump(), **overrides})
    policy = batching if batching is not None else BatchPolicy.from_env()
    service = _ScoringService(load_model(package_dir), limits=chosen, batching=policy)
    routes = [
        Route("/health", service.health, methods=["GET"]),
        Route("/metadata", service.metadata, methods=["GET"]),
        Route("/score", service.score, methods=["POST"]),
        Route("/metrics", service.metrics, methods=["POST"]),
    ]
    return ScoringApp(service, routes)

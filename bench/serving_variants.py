"""Run our model server with changes proposed for ``mlc/serving``, to measure them first.

Not part of the product: ``bench_scoring.py --ours-variants`` starts this instead of
``python -m mlc.serving serve`` to try, without editing ``mlc/``,

* ``--fast-http``: uvicorn with ``loop="uvloop", http="httptools"`` (needs both
  installed; the project's venv has neither, so uvicorn falls back to asyncio + h11);
* ``--microbatch``: valid ``/score`` requests (one record or up to 256) that reach the
  model in the same event-loop turn are scored together by one ``score_batch`` call, so
  the model's fixed per-call cost (scikit-learn's input validation, about 0.4 ms here)
  is paid once per turn instead of once per request. It adds no timer and so no waiting: a lone request
  is scored at once.

    python bench/serving_variants.py --package DIR --port P --fast-http --microbatch
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starlette.requests import Request  # noqa: E402 (after the path setup)
from starlette.responses import Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from mlc.serving import create_app  # noqa: E402
from mlc.serving.app import JSONResponse, _error  # noqa: E402

Records = list[dict[str, Any]]


MICROBATCH_MAX_RECORDS = 256
"""Larger arrays keep the unchanged path (scored in a worker thread)."""


class MicroBatcher:
    """Collects the records of requests submitted in one event-loop turn and scores them
    with one ``score_batch`` call."""

    def __init__(self, score_batch: Any) -> None:
        self._score_batch = score_batch
        self._pending: list[tuple[Records, asyncio.Future[Records]]] = []
        self._scheduled = False

    def submit(self, records: Records) -> asyncio.Future[Records]:
        """Queue ``records``; the future resolves to their outputs after the flush."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Records] = loop.create_future()
        self._pending.append((records, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        pending, self._pending, self._scheduled = self._pending, [], False
        try:
            outputs = self._score_batch([r for records, _ in pending for r in records])
        except Exception as exc:  # every waiting request gets the model's error
            for _, future in pending:
                future.set_exception(exc)
            return
        start = 0
        for records, future in pending:
            future.set_result(outputs[start : start + len(records)])
            start += len(records)


def build(package: Path, *, microbatch: bool, max_records: int = MICROBATCH_MAX_RECORDS) -> Any:
    """The app of ``mlc.serving.create_app``, its ``/score`` optionally micro-batched."""
    app = create_app(package)
    if not microbatch:
        return app
    route = next(r for r in app.routes if isinstance(r, Route) and r.path == "/score")
    service = route.endpoint.__self__  # type: ignore[attr-defined]
    batcher = MicroBatcher(service.model.score_batch)

    async def score(request: Request) -> Response:
        body = await request.body()
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return await service.score(request)  # errors take the unchanged path
        single = type(payload) is dict
        records = [payload] if single else payload
        if (
            type(records) is not list
            or not 0 < len(records) <= max_records
            or service.validator.problems(records)
        ):
            return await service.score(request)
        try:
            outputs = await batcher.submit(records)
        except Exception as exc:
            return _error(
                500, f"model {service.model.name}: score_batch() raised {type(exc).__name__}: {exc}"
            )
        return JSONResponse(outputs[0] if single else outputs)

    app.router.routes[app.routes.index(route)] = Route("/score", score, methods=["POST"])
    return app


def main() -> None:
    """Parse, build, serve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fast-http", action="store_true", help="uvloop + httptools")
    parser.add_argument("--microbatch", action="store_true", help="batch concurrent requests")
    parser.add_argument(
        "--microbatch-max-records",
        type=int,
        default=MICROBATCH_MAX_RECORDS,
        help="requests with more records bypass the micro-batcher (1: single records only)",
    )
    args = parser.parse_args()
    import uvicorn

    app = build(args.package, microbatch=args.microbatch, max_records=args.microbatch_max_records)
    extra: dict[str, Any] = {"loop": "uvloop", "http": "httptools"} if args.fast_http else {}
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning", **extra)


if __name__ == "__main__":
    main()

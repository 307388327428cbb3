"""One model-server process hosting many snapshots: per-model routes under one port.

Every online deployment used to be its own process of ~146 MB, mostly the interpreter and
the model's libraries, the same in each. A host shares those and pays only for each
model's own objects:

* models live in a folder, one package per sub-folder named by its id (a runtime adds a
  deployment by unpacking it there and removes it by deleting the folder; no admin API
  on the scoring port). Routes are ``/models/{id}/health``, ``/metadata``, ``/score`` and
  ``/metrics``, with the single-model server's semantics and limits; ``/models`` lists the
  ids present and loaded;
* a model is loaded on its first request (in a thread, once, however many requests race),
  unloaded when its folder goes away (noticed by its next request, the next load or the
  next process ``/health``) and loaded again when its package is replaced (its
  ``manifest.yaml`` changed: another inode or ctime);
* an optional ``<id>.json`` beside the package, ``{"version": ..., "sha256": ...,
  "capture": PATH}``, is the identity the model's ``/health`` and ``/metadata`` report and
  the file its captured answers go to (one process serves many snapshots, so the
  single-model server's environment variables cannot say them);
* after each load, least recently used models are unloaded while the process's resident
  memory is over ``memory_budget_mb`` (the newest stays). Python keeps freed memory for
  reuse, so the budget bounds growth rather than shrinking the process at once;
* a package whose requirements this interpreter does not meet is refused with 409 and
  the reason, so the runtime gives it a process of its own.

Packages are imported under names unique to their folder, so copies of the same model
coexist. A package's helper modules (beside its entry module) share ``sys.modules`` by
name with other packages; give such models their own process.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mlc.errors import InvalidPackageError, MLCError
from mlc.serving.app import JSONResponse, _ScoringService
from mlc.serving.limits import ServingLimits
from mlc.serving.microbatch import BatchPolicy
from mlc.serving.model_code import load_model

MEMORY_BUDGET_ENV = "MLC_HOST_MEMORY_MB"
DEFAULT_MEMORY_BUDGET_MB = 4096

Handler = Callable[[_ScoringService, Request], Awaitable[Response]]


def resident_mb() -> float:
    """This process's resident memory in MB (Linux ``/proc``; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class _Hosted:
    service: _ScoringService | None = None
    failure: str | None = None
    stamp: tuple[int, int, int] | None = None
    """``manifest.yaml``'s (device, inode, ctime) when loaded: a new package is a new stamp."""
    last_used: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelHost:
    """The models of one folder, loaded on demand and evicted under a memory budget."""

    def __init__(
        self,
        models_dir: Path,
        *,
        limits: ServingLimits | None = None,
        batching: BatchPolicy | None = None,
        memory_budget_mb: float | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.limits = limits or ServingLimits.from_env()
        self.batching = batching or BatchPolicy.from_env()
        budget = memory_budget_mb or float(os.environ.get(MEMORY_BUDGET_ENV, DEFAULT_MEMORY_BUDGET_MB))
        self.memory_budget_mb = budget
        self._models: dict[str, _Hosted] = {}

    def present(self) -> list[str]:
        """Ids of the packages in the folder (loaded or not), sorted."""
        try:
            names = sorted(os.listdir(self.models_dir))
        except OSError:
            return []
        return [n for n in names if not n.startswith(".") and _stamp(self.models_dir / n) is not None]

    def loaded(self) -> list[str]:
        """Ids of the models in memory, least recently used first."""
        live = [(h.last_used, i) for i, h in self._models.items() if h.service is not None]
        return [i for _, i in sorted(live)]

    async def service(self, model_id: str) -> _ScoringService | Response:
        """The loaded model ``model_id``, or the 404/409/500 response saying why there is none."""
        package = self.models_dir / model_id
        stamp = None if "/" in model_id or model_id.startswith(".") else _stamp(package)
        if stamp is None:
            self._unload(model_id)
            return _error(404, f"no model {model_id!r} on this host")
        hosted = self._models.get(model_id)
        if hosted is not None and hosted.stamp != stamp:  # replaced by another package
            self._unload(model_id)
            hosted = None
        if hosted is None:
            hosted = self._models.setdefault(model_id, _Hosted(stamp=stamp))
        hosted.last_used = time.monotonic()
        if hosted.service is None and hosted.failure is None:
            await run_in_threadpool(self._load, model_id, hosted, package)
        if hosted.failure is not None:
            status = 409 if hosted.failure.startswith("409 ") else 500
            return _error(status, hosted.failure.removeprefix("409 "))
        assert hosted.service is not None
        return hosted.service

    def _load(self, model_id: str, hosted: _Hosted, package: Path) -> None:
        with hosted.lock:  # racing first requests load once
            if hosted.service is not None or hosted.failure is not None:
                return
            try:
                identity, capture = _identity(self.models_dir / f"{model_id}.json")
                model = load_model(package)
            except InvalidPackageError as exc:
                hosted.failure = f"409 {exc}; it needs a model server of its own"
                return
            except MLCError as exc:
                hosted.failure = str(exc)
                return
            hosted.service = _ScoringService(
                model, limits=self.limits, batching=self.batching, identity=identity, capture=capture
            )
        self.sweep()
        self._evict(keep=model_id)

    def sweep(self) -> None:
        """Unload the models whose package was removed."""
        for model_id in list(self._models):
            if _stamp(self.models_dir / model_id) is None:
                self._unload(model_id)

    def _evict(self, *, keep: str) -> None:
        for model_id in self.loaded():
            if resident_mb() <= self.memory_budget_mb:
                return
            if model_id != keep:
                self._unload(model_id)

    def _unload(self, model_id: str) -> None:
        hosted = self._models.pop(model_id, None)
        if hosted is not None and hosted.service is not None:
            if hosted.service.batcher is not None:
                hosted.service.batcher.close()
            hosted.service = None
            gc.collect()


def _stamp(package: Path) -> tuple[int, int, int] | None:
    """(device, inode, ctime) of the package's ``manifest.yaml``; None when there is none."""
    try:
        info = os.stat(package / "manifest.yaml")
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_ctime_ns)


def _identity(path: Path) -> tuple[tuple[str | None, str | None] | None, Path | None]:
    """(version, sha256) and the capture file from the ``<id>.json`` the runtime wrote, if any."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            version, sha256, capture = data.get("version"), data.get("sha256"), data.get("capture")
            return (
                (None if version is None else str(version), None if sha256 is None else str(sha256)),
                None if capture is None else Path(str(capture)),
            )
    return None, None


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def create_host_app(host: ModelHost) -> Starlette:
    """The ASGI app of ``host``: ``/health`` for the process, ``/models/{id}/...`` per model."""

    def route(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            found = await host.service(request.path_params["model_id"])
            if isinstance(found, Response):
                return found
            return await handler(found, request)

        return endpoint

    async def listing(request: Request) -> Response:
        return JSONResponse({"models": host.present(), "loaded": host.loaded()})

    async def health(request: Request) -> Response:
        host.sweep()
        loaded = len(host.loaded())
        return JSONResponse({"status": "ok", "loaded": loaded, "resident_mb": round(resident_mb())})

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/models", listing, methods=["GET"]),
            Route("/models/{model_id}/health", route(_ScoringService.health), methods=["GET"]),
            Route("/models/{model_id}/metadata", route(_ScoringService.metadata), methods=["GET"]),
            Route("/models/{model_id}/score", route(_ScoringService.score), methods=["POST"]),
            Route("/models/{model_id}/metrics", route(_ScoringService.metrics), methods=["POST"]),
        ]
    )

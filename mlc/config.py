"""Settings read from the environment, in one place.

Every process (CLI, worker, model server launcher) builds ``Settings.from_env()`` so
``MLC_HOME``, ``MLC_DATABASE_URL`` and ``TEMPORAL_ADDRESS`` mean the same everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TASK_QUEUE = "mlc"
"""The task queue of the main worker and of the default local runtimes (type it in the UI)."""


DEFAULT_RECONCILE_SECONDS = 30.0
"""Default interval of the runtime reconcilers' health checks."""
DEFAULT_WORKFLOW_CACHE = 100
"""Workflow runs a worker keeps in memory. Temporal's default is 1000; at ~0.2-0.45 MB per
cached run that is 320-570 MB, while 100 keeps a worker under 200 MB with 10,000 runs
parked at gates (bench/bench_load.py). Runs beyond it replay when they next act."""

TRUST_ROOT_FILE = "trust-root"
"""Under ``home``: the pinned key id of the first admin, written by ``mlc admin init``."""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class TemporalTLS:
    """Mutual TLS to the Temporal of ``mlc dev`` (its files under ``MLC_HOME/tls``)."""

    ca: Path
    """The CA that signed the server's certificate (and the client's)."""
    cert: Path
    key: Path
    server_name: str = "localhost"


@dataclass(frozen=True)
class Settings:
    """Where state lives and which servers to talk to."""

    home: Path
    """All local state: artifacts, runtime working dirs, embedded servers' data."""
    database_url: str | None
    """PostgreSQL DSN; None means "the embedded server under ``home``" (``mlc dev``)."""
    temporal_address: str
    temporal_namespace: str
    task_queue: str
    author_role: str = "lifecycle-author"
    """Role needed to upload lifecycle code (``MLC_AUTHOR_ROLE``)."""
    trust_root: str | None = None
    """Key id (``SHA256:...``) of the installation's first admin: ``MLC_TRUST_ROOT``, else
    the ``trust-root`` file ``mlc admin init`` writes under ``home``. Workers refuse to
    verify anything without it, so a forged ``init`` row cannot take over."""
    worker_database_url: str | None = None
    """DSN of the workers' least-privilege role (``MLC_WORKER_DATABASE_URL``); None uses
    ``database_url``."""
    reconcile_seconds: float = DEFAULT_RECONCILE_SECONDS
    """How often each runtime's reconciler checks its serving deployments
    (``MLC_RECONCILE_SECONDS``); applies to reconcilers started from then on."""
    workflow_cache: int = DEFAULT_WORKFLOW_CACHE
    """Workflow runs a worker keeps in memory (``MLC_WORKFLOW_CACHE``); the others are
    replayed from their history when they next act. Bounds a worker's memory however
    many runs wait at gates (see bench/README.md, bench_load.py)."""
    temporal_tls: TemporalTLS | None = None
    """Client certificate for the Temporal of a running ``mlc dev`` (read from its
    ``dev.json``); when set it is used instead of ``TEMPORAL_TLS_*`` and profiles."""
    api_url: str | None = None
    """The control plane (``MLC_API_URL``): when set, the CLI talks only to ``mlc server`` and
    never opens the database or Temporal itself."""
    servers_die_with_worker: bool = False
    """Local model servers get a parent-death signal: ``mlc dev`` sets it, so they stop
    with it however it stops. A standalone ``mlc worker`` leaves them serving when it
    stops; the next worker finds them by their ``deployment.json``."""

    @classmethod
    def from_env(cls, *, home: Path | None = None) -> Settings:
        """Build settings from ``MLC_*`` and ``TEMPORAL_*`` variables."""
        root = home or Path(os.environ.get("MLC_HOME", Path.home() / ".mlc"))
        return cls(
            home=root.expanduser().resolve(),
            database_url=os.environ.get("MLC_DATABASE_URL") or None,
            temporal_address=os.environ.get("TEMPORAL_ADDRESS", "127.0.0.1:7233"),
            temporal_namespace=os.environ.get("TEMPORAL_NAMESPACE", "default"),
            task_queue=os.environ.get("MLC_TASK_QUEUE", DEFAULT_TASK_QUEUE),
            author_role=os.environ.get("MLC_AUTHOR_ROLE") or "lifecycle-author",
            trust_root=os.environ.get("MLC_TRUST_ROOT")
            or _read(root.expanduser().resolve() / TRUST_ROOT_FILE),
            worker_database_url=os.environ.get("MLC_WORKER_DATABASE_URL") or None,
            reconcile_seconds=float(os.environ.get("MLC_RECONCILE_SECONDS") or DEFAULT_RECONCILE_SECONDS),
            workflow_cache=int(os.environ.get("MLC_WORKFLOW_CACHE") or DEFAULT_WORKFLOW_CACHE),
            api_url=os.environ.get("MLC_API_URL") or None,
        )

    @property
    def artifact_dir(self) -> Path:
        """Immutable snapshot archives, addressed by sha256."""
        return self.home / "artifacts"

    @property
    def runtime_dir(self) -> Path:
        """Working directories of deployments, one folder per runtime."""
        return self.home / "runtimes"

    @property
    def platform_key_path(self) -> Path:
        """The inventory worker's key for runtime grants (``MLC_PLATFORM_KEY`` overrides)."""
        return Path(os.environ.get("MLC_PLATFORM_KEY") or self.home / "keys" / "platform.pem")

    @property
    def cache_dir(self) -> Path:
        """Rebuildable caches (wheelhouses for container images)."""
        return self.home / "cache"

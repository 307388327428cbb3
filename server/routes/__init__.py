"""The API's resources, one module each; importing a module declares its endpoints."""

from server.routes import (
    artifacts,
    governance,
    lifecycle_runs,
    lifecycle_uploads,
    me,
    rollbacks,
    snapshots,
)

MODULES = (me, snapshots, artifacts, governance, lifecycle_runs, lifecycle_uploads, rollbacks)

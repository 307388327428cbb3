"""The API's resources, one module each; importing a module declares its endpoints."""

from server.routes import (
    artifacts,
    governance,
    lifecycle_runs,
    lifecycle_uploads,
    me,
    rollbacks,
    snapshots,
    web_sessions,
)

MODULES = (
    me,
    snapshots,
    web_sessions,
    artifacts,
    governance,
    lifecycle_runs,
    lifecycle_uploads,
    rollbacks,
)

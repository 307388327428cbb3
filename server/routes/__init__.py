"""The API's resources, one module each; importing a module declares its endpoints."""

from server.routes import (
    artifacts,
    audit,
    deployments,
    governance,
    history,
    lifecycle_runs,
    lifecycle_uploads,
    lifecycles,
    me,
    policies,
    rollbacks,
    runs,
    runtimes,
    snapshots,
    users,
    web_sessions,
)

MODULES = (
    me,
    snapshots,
    web_sessions,
    runtimes,
    users,
    policies,
    deployments,
    history,
    lifecycles,
    runs,
    audit,
    artifacts,
    governance,
    lifecycle_runs,
    lifecycle_uploads,
    rollbacks,
)

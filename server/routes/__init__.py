"""The API's resources, one module each; importing a module declares its endpoints."""

from server.routes import (
    audit,
    deployments,
    history,
    lifecycles,
    me,
    policies,
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
)

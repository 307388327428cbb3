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
)

MODULES = (me, snapshots, runtimes, users, policies, deployments, history, lifecycles, runs, audit)

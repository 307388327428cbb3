"""One exception tree for the project; activities map third-party errors onto it.

Every message names the thing it is about (model, version, stage, runtime, file) and,
where it can, what to do next, because people read these in the CLI and the Web UI.
"""

from __future__ import annotations


class MLCError(Exception):
    """Base class of every error this project raises on purpose."""

    retryable: bool = False
    """Whether retrying the same call could succeed (activities turn False into non_retryable)."""


class InvalidPackageError(MLCError):
    """A model package directory or its manifest is not valid."""


class NotFoundError(MLCError):
    """A model, snapshot, runtime, deployment or lifecycle does not exist."""


class ConflictError(MLCError):
    """The request contradicts the inventory (e.g. a second run for one snapshot)."""


class NoRuntimeError(MLCError):
    """No runtime serves a snapshot's service tag in a stage."""


class PermissionDeniedError(MLCError):
    """The identity lacks the role the action needs."""


class RuntimeUnavailableError(MLCError):
    """A runtime's engine or host cannot be reached right now (retryable)."""

    retryable = True


class DeploymentFailedError(MLCError):
    """A deployment could not be brought up (bad image, crash at start, health timeout)."""


class ScoringError(MLCError):
    """A model raised while scoring, or returned something that is not a JSON object."""


class InvalidLifecycleError(MLCError):
    """Uploaded lifecycle code failed validation; the message carries file, line and reason."""

"""One exception tree for the project; activities map third-party errors onto it.

Every message names the thing it is about (model, version, stage, runtime, file) and,
where it can, what to do next, because people read these in the CLI and the Web UI.
"""

from __future__ import annotations


class MLCError(Exception):
    """Base class of every error this project raises on purpose."""

    retryable: bool = False
    """Whether retrying the same call could succeed (activities turn False into non_retryable)."""

    exit_code: int = 1
    """The ``mlc`` command's exit status for this error: 3 not found, 4 refused, 5 unavailable."""


class InvalidPackageError(MLCError):
    """A model package directory or its manifest is not valid."""


class NotFoundError(MLCError):
    """A model, snapshot, runtime, deployment or lifecycle does not exist."""

    exit_code = 3


class ConflictError(MLCError):
    """The request contradicts the inventory (e.g. a second run for one snapshot)."""

    exit_code = 4


class NoRuntimeError(MLCError):
    """No runtime serves a snapshot's service tag in a stage."""


class PermissionDeniedError(MLCError):
    """The identity lacks the role the action needs."""

    exit_code = 4


class RuntimeUnavailableError(MLCError):
    """A runtime's engine or host cannot be reached right now (retryable)."""

    retryable = True
    exit_code = 5


class DeploymentFailedError(MLCError):
    """A deployment could not be brought up (bad image, crash at start, health timeout)."""


class ScoringError(MLCError):
    """A model raised while scoring, or returned something that is not a JSON object."""


class InvalidLifecycleError(MLCError):
    """Uploaded lifecycle code failed validation; the message carries file, line and reason."""


class InvalidKeyError(MLCError):
    """A key file or public key is missing, unreadable or not Ed25519."""


class RefusedError(MLCError):
    """A signed statement or an action failed verification or policy; the message says which check."""

    exit_code = 4


class PrerequisiteError(MLCError):
    """Something a command needs from its host is missing or cannot be reached; checked
    when ``mlc dev`` or ``mlc worker`` starts (``workers/prerequisites.py``), each kind with
    its own exit code."""

    exit_code = 10


class NginxMissingError(PrerequisiteError):
    """nginx, which runs the gateways of runtimes with stable endpoints, is not installed."""

    exit_code = 10


class BubblewrapMissingError(PrerequisiteError):
    """bubblewrap, the sandbox of the uploaded-lifecycle worker, is missing or cannot sandbox here."""

    exit_code = 11


class DockerEngineUnreachableError(PrerequisiteError):
    """The Docker engine of a docker runtime the worker serves cannot be reached."""

    exit_code = 12


class KafkaBrokerUnreachableError(PrerequisiteError):
    """No Kafka broker of a streaming runtime the worker serves answers."""

    exit_code = 13

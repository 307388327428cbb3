"""Stage policies: which stages are protected and who may let a snapshot into them.

Policies live in the inventory as admin-signed statements; a run's ``spec`` can only
narrow who may approve (its gate approvers are intersected with the policy's), never
widen it. Without a stored policy PROD is protected and admitted by the UAT gate.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from mlc.domain import Frozen

ROLE_PREFIX = "role:"


class StagePolicy(Frozen):
    """The rules for one stage's gate and for deploying into the stage."""

    stage: str
    protected: bool = False
    """Deploying into a protected stage needs verified approvals at ``admitted_by``."""
    admitted_by: str | None = None
    """The gate (stage name) whose approvals admit a snapshot into this protected stage."""
    approvers: tuple[str, ...] = ("role:approver",)
    """Who may decide at this stage's gate: identities and ``role:NAME``."""
    min_approvals: int = Field(default=1, ge=1, le=10)
    """Distinct approvers needed at this stage's gate."""
    forbid_registrant: bool = True
    """The person who registered the snapshot may not approve it."""
    forbid_starter: bool = True
    """The person who started the lifecycle may not approve it."""
    forbid_uploader: bool = True
    """The person who uploaded the lifecycle's code may not approve runs of it."""

    @model_validator(mode="after")
    def _protected_needs_gate(self) -> StagePolicy:
        if self.protected and not self.admitted_by:
            raise ValueError(f"protected stage {self.stage} needs admitted_by (the gate that admits to it)")
        if self.admitted_by == self.stage:
            raise ValueError(f"stage {self.stage} cannot be admitted by its own gate")
        return self


DEFAULT_POLICIES = {"PROD": StagePolicy(stage="PROD", protected=True, admitted_by="UAT")}
"""What applies until an admin signs another policy for a stage."""


def allowed_by(entries: tuple[str, ...], principal: str, roles: set[str]) -> bool:
    """True when ``principal`` (holding ``roles``) matches one of the approver entries."""
    return any(
        (e.startswith(ROLE_PREFIX) and e.removeprefix(ROLE_PREFIX) in roles) or e == principal
        for e in entries
    )


def segregation_problem(
    policy: StagePolicy,
    principal: str,
    *,
    registrant: str | None,
    starter: str | None,
    uploader: str | None,
) -> str | None:
    """Why ``principal`` may not approve under segregation of duties, or None."""
    if policy.forbid_registrant and principal == registrant:
        return f"{principal} registered this snapshot and may not approve it (segregation of duties)"
    if policy.forbid_starter and principal == starter:
        return f"{principal} started this lifecycle and may not approve it (segregation of duties)"
    if policy.forbid_uploader and principal == uploader:
        return f"{principal} uploaded this lifecycle's code and may not approve it (segregation of duties)"
    return None

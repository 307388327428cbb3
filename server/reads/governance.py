"""Rows of the verified governance state: people, runtime evidence keys, stage policies."""

from __future__ import annotations

from typing import Any

from mlc.trust.governance import Governance
from mlc.trust.keys import public_text
from mlc.trust.policy import StagePolicy


def user_rows(state: Governance) -> list[dict[str, Any]]:
    """People and automations by name, with their roles and keys (``mlc user list``)."""
    return [
        {
            "name": p.name,
            "roles": sorted(p.roles),
            "keys": sorted(p.active_keys()),
            "revoked_keys": sorted(p.revoked),
        }
        for p in sorted(state.principals.values(), key=lambda p: p.name)
    ]


def runtime_key_rows(state: Governance) -> list[dict[str, Any]]:
    """The runtimes' evidence keys by runtime and key id (``mlc runtime key list``)."""
    return [
        {"runtime": k.runtime, "keyid": kid, "revoked": k.revoked, "public_key": public_text(k.public)}
        for kid, k in sorted(state.evidence_keys.items(), key=lambda item: (item[1].runtime, item[0]))
    ]


def policies(state: Governance) -> list[StagePolicy]:
    """The policy in force (signed, else the default) for every stage that has one or a
    runtime, and PROD, by stage (``mlc policy list``)."""
    stages = sorted({*state.policies, *(r.stage for r in state.runtimes.values()), "PROD"})
    return [state.policy(s) for s in stages]

"""Identities, signed statements and the policy the platform enforces.

Everything a person decides (an approval, a grant, a policy, an upload) is an in-toto
Statement in a DSSE envelope (the format: :mod:`mlc.statements`), signed with the person's
Ed25519 key. The platform never trusts a row because it exists: it re-verifies signatures
against keys whose own registration chains back to the installation's pinned trust root. What a runtime
reports (test results, deploy results, observations, findings) counts only when signed
with that runtime's evidence key, registered the same way (:mod:`mlc.trust.evidence`).
"""

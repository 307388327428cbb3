"""``mlc server``: the control plane's HTTP API and web page.

The only process besides the workers that holds the inventory owner's DSN and a Temporal
client for people. It authenticates callers (RFC 9421 signatures with their registered key,
or OIDC tokens) and forwards signed statements to where they are verified today, so a
compromised server can refuse or delay a decision but never forge one
(``docs/design/control-plane.md``).
"""

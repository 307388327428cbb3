"""Runtime drivers: one package per runtime kind, behind :class:`RuntimeDriver`.

``base`` holds the interface and its requests; ``registry`` finds a kind's driver,
settings and CLI options by :class:`~mlc.domain.RuntimeKind`; ``local/`` and ``docker/``
are the kinds, ``gateway/`` the stable endpoints both put in front of their deployments,
``streams`` what their streaming deployments share. Adding a kind means a package with a
``kind`` module registered in :data:`~activities.runtimes.registry.KIND_MODULES`; no
workflow changes, because workflows only ask "deploy this snapshot to that runtime".

The package itself imports nothing, so the CLI can read the registry without loading the
runtime interface (and Temporal with it).
"""

"""The one place a Temporal client is made, with the pydantic data converter.

Connection settings follow Temporal's own client configuration (``temporalio.envconfig``),
so the CLI and every worker honour what the Temporal CLI and SDKs honour:

- address and namespace: ``TEMPORAL_ADDRESS`` / ``TEMPORAL_NAMESPACE`` as read into
  :class:`mlc.config.Settings` (or the running ``mlc dev``);
- ``TEMPORAL_TLS`` and ``TEMPORAL_TLS_*`` (server CA, client certificate and key, server
  name), ``TEMPORAL_API_KEY`` and ``TEMPORAL_GRPC_META_*``;
- a profile from a TOML file, read only when ``TEMPORAL_PROFILE`` or ``TEMPORAL_CONFIG_FILE``
  is set (default file ``~/.config/temporalio/temporal.toml``); the variables above
  override it, and its address/namespace apply when those two variables are unset.

The file is opt-in so that a Temporal CLI profile made for some other cluster does not
silently redirect ``mlc`` commands aimed at a local ``mlc dev``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.envconfig import ClientConfigProfile
from temporalio.service import RPCError, RPCStatusCode, TLSConfig

from mlc.config import Settings, TemporalTLS
from mlc.errors import RuntimeUnavailableError
from mlc.names import SEARCH_ATTRIBUTES

_PROFILE_VARS = ("TEMPORAL_PROFILE", "TEMPORAL_CONFIG_FILE")
"""Either one set means "read the profile file"."""


def connect_options(settings: Settings, *, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for :meth:`Client.connect` (``target_host`` included) from
    ``settings`` and Temporal's client configuration in ``environ`` (default: the process's).

    Raises :class:`RuntimeUnavailableError` when the configuration or a file it names
    cannot be read.
    """
    if settings.temporal_tls is not None:  # a running mlc dev's own certificate: nothing else applies
        return {**_embedded_options(settings), "tls": tls_config(settings.temporal_tls)}
    env = dict(os.environ if environ is None else environ)
    use_file = any(env.get(name) for name in _PROFILE_VARS)
    try:
        profile = ClientConfigProfile.load(disable_file=not use_file, override_env_vars=env)
        config = profile.to_client_connect_config()
    except OSError as exc:
        raise RuntimeUnavailableError(
            f"cannot read a TLS file of the Temporal client configuration: {exc}; "
            "check the TEMPORAL_TLS_*_PATH variables (or the profile's tls paths)"
        ) from exc
    except RuntimeError as exc:  # envconfig.ConfigError: unknown profile, bad TOML
        raise RuntimeUnavailableError(
            f"invalid Temporal client configuration ({_describe_profile(env)}): {exc}"
        ) from exc
    options: dict[str, Any] = {
        "target_host": settings.temporal_address,
        "namespace": settings.temporal_namespace,
    }
    if use_file and profile.address and "TEMPORAL_ADDRESS" not in env:
        options["target_host"] = profile.address
    if use_file and profile.namespace and "TEMPORAL_NAMESPACE" not in env:
        options["namespace"] = profile.namespace
    if "tls" in config:
        options["tls"] = config["tls"]
    if "api_key" in config:
        options["api_key"] = config["api_key"]
    if "rpc_metadata" in config:
        options["rpc_metadata"] = config["rpc_metadata"]
    return options


async def connect(settings: Settings, *, identity: str | None = None, plain: bool = False) -> Client:
    """Connect to Temporal as ``settings`` and Temporal's client configuration say, or
    raise a readable :class:`RuntimeUnavailableError`.

    ``identity`` names this client (and its workers) in Temporal; the SDK's default is
    ``pid@host``. ``plain=True`` ignores ``TEMPORAL_TLS_*``, API key and profiles and connects
    to ``settings.temporal_address``: the embedded server ``mlc dev`` just started (through
    its mutual-TLS proxy when ``settings.temporal_tls`` is set, else in plain text).
    """
    if plain:
        options = _embedded_options(settings)
        if settings.temporal_tls is not None:
            options["tls"] = tls_config(settings.temporal_tls)
    else:
        options = connect_options(settings)
    if identity is not None:
        options["identity"] = identity
    target = options.pop("target_host")
    try:
        return await Client.connect(target, data_converter=pydantic_data_converter, **options)
    except RuntimeError as exc:
        raise RuntimeUnavailableError(f"cannot reach Temporal at {target}: {exc}; {_hint(options)}") from exc


def _embedded_options(settings: Settings) -> dict[str, Any]:
    return {"target_host": settings.temporal_address, "namespace": settings.temporal_namespace}


def tls_config(tls: TemporalTLS) -> TLSConfig:
    """The SDK's TLS settings for ``mlc dev``'s client certificate (files read now).

    Raises:
        RuntimeUnavailableError: a file cannot be read (naming it).
    """
    try:
        return TLSConfig(
            server_root_ca_cert=tls.ca.read_bytes(),
            domain=tls.server_name,
            client_cert=tls.cert.read_bytes(),
            client_private_key=tls.key.read_bytes(),
        )
    except OSError as exc:
        raise RuntimeUnavailableError(
            f"cannot read mlc dev's Temporal client certificate: {exc}; Temporal's port takes only "
            "clients with that certificate (run as the user who started `mlc dev`)"
        ) from exc


def tls_environ(settings: Settings) -> dict[str, str]:
    """``TEMPORAL_TLS_*`` variables naming ``settings``' client certificate ({} without one):
    how a worker started as another process (the lifecycle sandbox) gets it."""
    tls = settings.temporal_tls
    if tls is None:
        return {}
    return {
        "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(tls.ca),
        "TEMPORAL_TLS_CLIENT_CERT_PATH": str(tls.cert),
        "TEMPORAL_TLS_CLIENT_KEY_PATH": str(tls.key),
        "TEMPORAL_TLS_SERVER_NAME": tls.server_name,
    }


def _hint(options: Mapping[str, Any]) -> str:
    tls = options.get("tls")
    if isinstance(tls, TLSConfig) or tls is True:
        parts = []
        if isinstance(tls, TLSConfig):
            parts = [
                name
                for name, value in (
                    ("server CA", tls.server_root_ca_cert),
                    ("client certificate", tls.client_cert),
                    ("client key", tls.client_private_key),
                    (f"server name {tls.domain}", tls.domain),
                )
                if value
            ]
        given = f" (given: {', '.join(parts)})" if parts else " (system CAs, no client certificate)"
        key = " and TEMPORAL_API_KEY" if options.get("api_key") else ""
        return (
            f"TLS is on{given}: check TEMPORAL_ADDRESS, the TEMPORAL_TLS_* settings{key} "
            "or the TEMPORAL_PROFILE in use (the server may require a client certificate, "
            "trust another CA or expect another server name)"
        )
    if options.get("api_key"):
        return "check TEMPORAL_ADDRESS and TEMPORAL_API_KEY"
    return "is `mlc dev` running, or is TEMPORAL_ADDRESS right?"


def _describe_profile(env: Mapping[str, str]) -> str:
    named = [f"{name}={env[name]}" for name in _PROFILE_VARS if env.get(name)]
    return ", ".join(named) or "TEMPORAL_* variables"


async def ensure_search_attributes(client: Client) -> None:
    """Register the lifecycle search attributes on the namespace if they are missing.

    ``mlc dev`` registers them when it starts its own server; this covers servers that
    someone else runs (and the time-skipping test server).
    """
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
        known = set(existing.custom_attributes)
    except RPCError as exc:
        if exc.status is not RPCStatusCode.UNIMPLEMENTED:  # the test server can only add
            raise
        known = set()
    missing = {name: _INDEXED[kind] for name, kind in SEARCH_ATTRIBUTES.items() if name not in known}
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
        )


_INDEXED = {
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT,
    "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
}

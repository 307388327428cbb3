"""OIDC token checks (server/auth/oidc.py) against a real provider process, without the server.

The HTTP-level cases (every reason code through ``mlc server``) are in test_api_auth.py;
here are the verifier's own decisions: settings, discovery, claims to roles, kid-less tokens.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from server.auth.oidc import Discovery, OidcVerifier, discover, parse_discovery
from server.errors import ApiError
from server.oidc_config import OidcConfig, OidcSetupError
from server.principal import Role
from tests.oidc_provider import CLIENT_ID, OidcProvider


def config_for(provider: OidcProvider, **changes: Any) -> OidcConfig:
    return OidcConfig(issuer=provider.issuer, audience=CLIENT_ID, jwks_cooldown=0, **changes)


def refusal(verifier: OidcVerifier, token: str) -> tuple[int, str | None, str]:
    with pytest.raises(ApiError) as caught:
        verifier.principal(verifier.verify(token))
    return caught.value.status, caught.value.reason, caught.value.error


def test_settings_from_env() -> None:
    assert OidcConfig.from_env({}) is None
    cfg = OidcConfig.from_env(
        {"MLC_OIDC_ISSUER": "https://idp.example", "MLC_OIDC_AUDIENCE": "mlc", "MLC_OIDC_JWKS_COOLDOWN": "0"}
    )
    assert cfg is not None
    assert (cfg.principal_claim, cfg.roles_claim, cfg.jwks_cooldown) == ("preferred_username", "groups", 0)
    assert dict(cfg.role_map) == {
        "mlc-readers": Role.READ_ONLY,
        "mlc-approvers": Role.MEMBER,
        "mlc-admins": Role.ADMIN,
    }
    custom = OidcConfig.from_env(
        {
            "MLC_OIDC_ISSUER": "https://i",
            "MLC_OIDC_AUDIENCE": "a",
            "MLC_OIDC_ROLE_MAP": "ops = admin, qa=read-only",
        }
    )
    assert custom is not None and dict(custom.role_map) == {"ops": Role.ADMIN, "qa": Role.READ_ONLY}
    secret = OidcConfig.from_env(
        {"MLC_OIDC_ISSUER": "https://i", "MLC_OIDC_AUDIENCE": "a", "MLC_OIDC_CLIENT_SECRET": "s3"}
    )
    assert secret is not None and secret.client_secret == "s3" and "s3" not in repr(secret)
    with pytest.raises(OidcSetupError, match="MLC_OIDC_AUDIENCE"):
        OidcConfig.from_env({"MLC_OIDC_ISSUER": "https://i"})
    with pytest.raises(OidcSetupError, match="'ops=root' is not group=role"):
        OidcConfig.from_env(
            {"MLC_OIDC_ISSUER": "https://i", "MLC_OIDC_AUDIENCE": "a", "MLC_OIDC_ROLE_MAP": "ops=root"}
        )
    with pytest.raises(OidcSetupError, match="MLC_OIDC_JWKS_COOLDOWN"):
        OidcConfig.from_env(
            {"MLC_OIDC_ISSUER": "https://i", "MLC_OIDC_AUDIENCE": "a", "MLC_OIDC_JWKS_COOLDOWN": "-1"}
        )


def test_discovery_refuses_another_issuer_and_symmetric_algorithms() -> None:
    cfg = OidcConfig(issuer="https://idp.example", audience="mlc")
    with pytest.raises(OidcSetupError, match="must be equal"):
        parse_discovery(cfg, {"issuer": "https://idp.example/", "jwks_uri": "https://idp.example/jwks"})
    with pytest.raises(OidcSetupError, match="no asymmetric"):
        parse_discovery(
            cfg,
            {
                "issuer": "https://idp.example",
                "jwks_uri": "https://idp.example/jwks",
                "id_token_signing_alg_values_supported": ["HS256", "none"],
            },
        )
    found = parse_discovery(
        cfg,
        {
            "issuer": "https://idp.example",
            "jwks_uri": "https://idp.example/jwks",
            "id_token_signing_alg_values_supported": ["HS256", "RS256", "ES256", "none"],
        },
    )
    assert found.algorithms == ("RS256", "ES256")


async def test_discovery_retries_until_the_provider_answers_then_gives_up() -> None:
    provider = OidcProvider()
    with pytest.raises(OidcSetupError, match="unreachable after 2 attempts"):
        await discover(config_for(provider), attempts=2)
    await provider.start()
    try:
        found = await discover(config_for(provider))
        assert found.jwks_uri.startswith(provider.issuer) and "RS256" in found.algorithms
    finally:
        await provider.stop()


async def test_claims_become_a_principal_with_the_highest_mapped_role(oidc_provider: OidcProvider) -> None:
    verifier = await OidcVerifier.start(config_for(oidc_provider))
    token = await oidc_provider.token(
        "u-1", username="carol", groups=["mlc-readers", "mlc-approvers", "other"]
    )
    principal = await verifier.authenticate(token)
    assert (principal.name, principal.role, principal.method) == ("carol", Role.MEMBER, "oidc")
    admin = await verifier.authenticate(
        await oidc_provider.token("u-2", username="dave", groups=["mlc-admins"])
    )
    assert admin.role == Role.ADMIN

    status, reason, message = refusal(
        verifier, await oidc_provider.token("u-3", username="eve", groups=["staff"])
    )
    assert (status, reason) == (403, "no-role") and "eve" in message and "mlc-readers" in message
    status, reason, _ = refusal(
        verifier, await oidc_provider.token("u-4", username="x\ny", groups=["mlc-admins"])
    )
    assert (status, reason) == (401, "bad-token")

    other_claim = await OidcVerifier.start(config_for(oidc_provider, principal_claim="email"))
    status, reason, message = refusal(other_claim, token)
    assert (status, reason) == (401, "bad-token") and "'email'" in message


async def test_token_refusals_name_their_reason(oidc_provider: OidcProvider) -> None:
    verifier = await OidcVerifier.start(config_for(oidc_provider))
    assert refusal(verifier, "not-a-jwt")[:2] == (401, "bad-token")
    token = await oidc_provider.token("u-1", groups=["mlc-readers"], client_id="another-app")
    assert refusal(verifier, token)[:2] == (401, "wrong-audience")
    head, body, _ = (await oidc_provider.token("u-1", groups=["mlc-readers"])).split(".")
    assert refusal(verifier, f"{head}.{body}.{'A' * 342}")[:2] == (401, "bad-token")  # forged signature


class _Jwks(BaseHTTPRequestHandler):
    keys: list[dict[str, Any]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps({"keys": self.keys}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, type[_Jwks]]]:
    """A real HTTP server publishing whatever keys the test puts in it."""
    handler = type("Handler", (_Jwks,), {"keys": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks", handler
    server.shutdown()
    server.server_close()


def test_a_kid_less_token_is_accepted_only_when_the_provider_has_one_key(
    jwks_server: tuple[str, type[_Jwks]],
) -> None:
    uri, handler = jwks_server
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    as_jwk = jwt.algorithms.RSAAlgorithm.to_jwk
    handler.keys = [as_jwk(private.public_key(), as_dict=True)]
    cfg = OidcConfig(issuer="https://idp.example", audience="mlc", jwks_cooldown=0)
    verifier = OidcVerifier(cfg, Discovery(jwks_uri=uri, algorithms=("RS256",)))
    now = int(time.time())
    claims = {"iss": cfg.issuer, "aud": "mlc", "sub": "s", "iat": now, "exp": now + 60}
    token = jwt.encode({**claims, "preferred_username": "kim", "groups": ["mlc-readers"]}, private, "RS256")
    assert "kid" not in jwt.get_unverified_header(token)
    assert verifier.principal(verifier.verify(token)).name == "kim"

    handler.keys = [*handler.keys, as_jwk(other.public_key(), as_dict=True)]
    fresh = OidcVerifier(cfg, Discovery(jwks_uri=uri, algorithms=("RS256",)))
    status, reason, message = refusal(fresh, token)
    assert (status, reason) == (401, "unknown-kid") and "publishes 2" in message
    no_iat = jwt.encode(
        {k: v for k, v in claims.items() if k != "iat"}, private, "RS256", headers={"kid": "k"}
    )
    handler.keys = [{**as_jwk(private.public_key(), as_dict=True), "kid": "k"}]
    assert refusal(OidcVerifier(cfg, Discovery(jwks_uri=uri, algorithms=("RS256",))), no_iat)[:2] == (
        401,
        "bad-token",
    )

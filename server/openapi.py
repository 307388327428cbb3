"""The OpenAPI document, built from the endpoint declarations the wrapper enforces."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from server.api import ENDPOINTS

ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "reason": {"type": ["string", "null"]}},
    "required": ["error"],
}
ERRORS = (
    (401, "not authenticated"),
    (403, "not allowed"),
    (413, "body too large"),
    (422, "invalid request"),
    (429, "rate limited"),
)


def _answer(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document(version: str) -> dict[str, Any]:
    """OpenAPI 3.1 for every declared endpoint, with security and error answers."""
    paths: dict[str, dict[str, Any]] = {}
    defs: dict[str, Any] = {}
    for spec in ENDPOINTS:
        operation: dict[str, Any] = {
            "summary": spec.summary,
            "description": f"Needs the API role `{spec.role.label}` or higher.",
            "parameters": [
                *(
                    {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                    for n in _names(spec.path)
                ),
                *({"name": n, "in": "query", "schema": {"type": "string"}} for n in spec.params),
            ],
            "responses": {
                str(spec.status): {
                    "description": "OK" if spec.status == 200 else "Accepted: continues after the answer",
                    "content": {"application/json": {"schema": _schema(spec.response, defs)}},
                },
                **{
                    str(code): {
                        "description": text,
                        "content": {"application/json": {"schema": ERROR_SCHEMA}},
                    }
                    for code, text in (
                        (401, "not authenticated"),
                        (403, "not allowed"),
                        (429, "rate limited"),
                    )
                },
            },
            "security": [{"httpSignature": []}, {"oidc": []}],
        }
        if spec.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _schema(spec.body, defs)}},
            }
        paths.setdefault(spec.path, {})[spec.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "mlc control plane", "version": version},
        "paths": paths,
        "components": {
            "schemas": defs,
            "securitySchemes": {
                "httpSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Signature",
                    "description": "RFC 9421 signature by the principal's registered Ed25519 key "
                    "(label `mlc`, tag `mlc-api`, covering @method, @target-uri and, with a body, "
                    "content-type and content-digest; created/expires at most 60 s apart; a fresh nonce).",
                },
                "oidc": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (OIDC ID token)"},
            },
        },
    }


def _parameter(name: str, where: str) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": {"type": "string"}}


def _names(path: str) -> list[str]:
    return [part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")]


def _schema(model: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """``model``'s JSON schema; the models it refers to go to ``defs`` (components.schemas)."""
    if model is None:
        return {}
    schema = TypeAdapter(model).json_schema(ref_template="#/components/schemas/{model}")
    defs.update(schema.pop("$defs", {}))
    return schema

"""The model package manifest (``manifest.yaml``) and its validation.

A model package is a directory holding this manifest and a scoring module with
``init()``, ``score(record) -> dict`` and optionally ``metrics(records) -> dict``. The
manifest is what the orchestrator knows about a model without importing its code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mlc.domain import check_name
from mlc.errors import InvalidPackageError

MANIFEST_FILE = "manifest.yaml"

FieldType = Literal["number", "integer", "string", "boolean"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputField(_Strict):
    """One field of a scoring record."""

    name: str
    type: FieldType = "number"
    required: bool = True


class SampleCase(_Strict):
    """A record with the output the model must give for it (the smoke test)."""

    input: dict[str, Any]
    expected: dict[str, Any]
    tolerance: float = 1e-6
    """Absolute tolerance for numeric outputs."""


class Evaluation(_Strict):
    """Labelled data the metrics test scores, relative to the package root."""

    path: str
    """JSON-lines file, one record per line including the label field."""
    label: str
    """Name of the 0/1 label field (removed before scoring)."""
    score_field: str
    """Output field holding the positive-class probability."""
    prediction_field: str | None = None
    """Optional output field holding the 0/1 decision, for accuracy/precision/recall."""


class ModelManifest(_Strict):
    """What a model package declares about itself."""

    name: str
    description: str = ""
    entry_module: str = "score"
    service_tags: tuple[str, ...] = Field(min_length=1)
    requirements: tuple[str, ...] = ()
    input_schema: tuple[InputField, ...] = ()
    samples: tuple[SampleCase, ...] = ()
    evaluation: Evaluation | None = None
    thresholds: dict[str, float] = Field(default_factory=dict)
    """Minimum value per metric (``auc: 0.8`` means AUC >= 0.8)."""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return check_name(value, "model name")

    @field_validator("service_tags")
    @classmethod
    def _valid_tags(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_name(t, "service tag") for t in tags)


def load_manifest(package_dir: Path) -> ModelManifest:
    """Read and validate ``package_dir/manifest.yaml``.

    Raises:
        InvalidPackageError: naming the file and every problem found.
    """
    path = package_dir / MANIFEST_FILE
    if not path.is_file():
        raise InvalidPackageError(f"{package_dir} is not a model package: {MANIFEST_FILE} is missing")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InvalidPackageError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidPackageError(f"{path}: expected a mapping at the top level")
    try:
        manifest = ModelManifest.model_validate(raw)
    except ValidationError as exc:
        raise InvalidPackageError(f"{path}: {exc}") from exc
    module = package_dir / f"{manifest.entry_module.replace('.', '/')}.py"
    if not module.is_file():
        raise InvalidPackageError(f"{path}: entry module {manifest.entry_module!r} has no file {module}")
    if manifest.evaluation and not (package_dir / manifest.evaluation.path).is_file():
        raise InvalidPackageError(f"{path}: evaluation data {manifest.evaluation.path} is missing")
    return manifest

"""The model package manifest (``manifest.yaml``) and its validation.

A model package is a directory holding this manifest and a scoring module with
``init()``, ``score(record) -> dict`` and optionally ``metrics(records) -> dict``. The
manifest is what the orchestrator knows about a model without importing its code.

Packages come from people the orchestrator does not trust, so the manifest is read as
hostile input: requirements must be plain index requirements (they end up as pip
arguments), and every path it names must stay inside the package.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mlc.domain import check_name
from mlc.errors import InvalidPackageError

MANIFEST_FILE = "manifest.yaml"

MAX_MANIFEST_BYTES = 1024 * 1024
"""A manifest is a page of YAML; anything bigger is refused before it is parsed."""

_ARCHIVE_SUFFIXES = (
    ".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz", ".tlz",
    ".tar.lz", ".tar.lzma",
)  # fmt: skip
"""Names pip would take for a local archive file when one exists in its working directory."""

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


def check_requirement(entry: str) -> str:
    """Return ``entry`` if it is a PEP 508 requirement on a package index, else raise.

    Requirements become ``pip download`` arguments, so an option (``-r /proc/self/environ``,
    ``--index-url=...``), a URL (``pkg @ https://...``) or a path would make pip read
    files or fetch from places nobody configured.

    Raises:
        ValueError: naming the entry and what to write instead.
    """
    hint = "write a name and version range from the package index, e.g. 'scikit-learn>=1.4'"
    try:
        requirement = Requirement(entry)
    except InvalidRequirement as exc:
        raise ValueError(f"requirement {entry!r} is not a PEP 508 requirement ({exc}); {hint}") from None
    if requirement.url is not None:
        raise ValueError(f"requirement {entry!r} names a URL, which is not allowed; {hint}")
    if requirement.name.lower().endswith(_ARCHIVE_SUFFIXES):
        raise ValueError(f"requirement {entry!r} looks like an archive file, which is not allowed; {hint}")
    return entry


def check_package_path(value: str, what: str) -> str:
    """Return ``value`` if it is a relative path without ``..`` (checked lexically), else raise.

    Raises:
        ValueError: naming ``what`` and the path.
    """
    path = PurePosixPath(value)
    if not value or "\\" in value or "\0" in value or path.is_absolute() or ".." in path.parts:
        raise ValueError(
            f"{what} {value!r} must be a relative path inside the package, without '..' or backslashes"
        )
    return value


def resolve_in_package(package_dir: Path, relative: str, what: str) -> Path:
    """``package_dir / relative`` with symbolic links resolved, refused if it leaves the package.

    Raises:
        InvalidPackageError: the path (or a link on the way) points outside ``package_dir``.
    """
    root = package_dir.resolve()
    try:
        resolved = (root / relative).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise InvalidPackageError(f"{package_dir}: {what} {relative} cannot be resolved: {exc}") from None
    if not resolved.is_relative_to(root):
        raise InvalidPackageError(
            f"{package_dir}: {what} {relative} resolves to {resolved}, outside the package; "
            "copy the file into the package instead of linking to it"
        )
    return resolved


class Evaluation(_Strict):
    """Labelled data the metrics test scores, relative to the package root."""

    path: str
    """JSON-lines file, one record per line including the label field (inside the package)."""
    label: str
    """Name of the 0/1 label field (removed before scoring)."""
    score_field: str
    """Output field holding the positive-class probability."""
    prediction_field: str | None = None
    """Optional output field holding the 0/1 decision, for accuracy/precision/recall."""

    @field_validator("path")
    @classmethod
    def _inside_package(cls, value: str) -> str:
        return check_package_path(value, "evaluation.path")


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

    @field_validator("entry_module")
    @classmethod
    def _valid_module(cls, value: str) -> str:
        if not all(part.isidentifier() for part in value.split(".")):
            raise ValueError(f"entry_module {value!r} must be a dotted Python module name, e.g. 'score'")
        return value

    @field_validator("requirements")
    @classmethod
    def _valid_requirements(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_requirement(e) for e in entries)


def load_manifest(package_dir: Path) -> ModelManifest:
    """Read and validate ``package_dir/manifest.yaml``.

    Raises:
        InvalidPackageError: naming the file and every problem found.
    """
    path = package_dir / MANIFEST_FILE
    if not path.is_file():
        raise InvalidPackageError(f"{package_dir} is not a model package: {MANIFEST_FILE} is missing")
    resolve_in_package(package_dir, MANIFEST_FILE, "the manifest")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise InvalidPackageError(
            f"{path}: {path.stat().st_size} bytes is more than a manifest may have "
            f"({MAX_MANIFEST_BYTES}); keep data in files the manifest names"
        )
    try:
        raw = _parse_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise InvalidPackageError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidPackageError(f"{path}: expected a mapping at the top level")
    try:
        manifest = ModelManifest.model_validate(raw)
    except ValidationError as exc:
        raise InvalidPackageError(f"{path}: {exc}") from exc
    module = f"{manifest.entry_module.replace('.', '/')}.py"
    if not resolve_in_package(package_dir, module, "entry module file").is_file():
        raise InvalidPackageError(
            f"{path}: entry module {manifest.entry_module!r} has no file {package_dir / module}"
        )
    if manifest.evaluation:
        data = resolve_in_package(package_dir, manifest.evaluation.path, "evaluation.path")
        if not data.is_file():
            raise InvalidPackageError(f"{path}: evaluation data {manifest.evaluation.path} is missing")
    return manifest


def _parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` without aliases: ``*refs`` let a page of YAML expand exponentially.

    Raises:
        yaml.YAMLError: invalid YAML, or an alias (with its position).
    """
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            mark = event.start_mark
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise yaml.YAMLError(f"{where}aliases (*{event.anchor}) are not allowed in a manifest")
    return yaml.safe_load(text)

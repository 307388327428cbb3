"""Import a model package's entry module once and expose its scoring functions.

Requirements are checked before the import so a missing library fails with a message
naming it and the model, instead of an ``ImportError`` deep inside model code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from mlc.errors import InvalidPackageError, ScoringError
from mlc.manifest import ModelManifest, load_manifest

Record = dict[str, Any]
ScoreFn = Callable[[Record], Record]
ScoreBatchFn = Callable[[list[Record]], list[Record]]
MetricsFn = Callable[[list[Record]], dict[str, Any]]
ScoreColumnsFn = Callable[[dict[str, Any]], Any]

_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass(frozen=True)
class LoadedModel:
    """A package's manifest plus its initialised scoring functions."""

    manifest: ModelManifest
    package_dir: Path
    score: ScoreFn
    score_batch: ScoreBatchFn
    """The module's own ``score_batch`` when it has one, else ``score`` in a loop."""
    vectorised: bool
    """True when ``score_batch`` is the module's own (worth a thread for big batches)."""
    metrics: MetricsFn | None
    score_columns: ScoreColumnsFn | None = None
    """The module's optional ``score_columns(columns)``: numpy arrays by field name in, output
    arrays by name out. Batch jobs use it to score without building a dict per record."""

    @property
    def name(self) -> str:
        """The model's name from its manifest."""
        return self.manifest.name


def check_requirements(manifest: ModelManifest) -> None:
    """Raise unless every requirement of ``manifest`` is installed (and, when possible, in range).

    Versions are compared only when ``packaging`` is importable: slim images may lack it,
    and a present-but-wrong version is rarer than a missing package.

    Raises:
        InvalidPackageError: naming the model and each missing or unsuitable requirement.
    """
    problems: list[str] = []
    for requirement in manifest.requirements:
        match = _REQUIREMENT_NAME.match(requirement)
        if match is None:
            problems.append(f"{requirement!r} is not a requirement specifier")
            continue
        name = match.group(1)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{requirement} is not installed")
            continue
        if not _satisfies(requirement, installed):
            problems.append(f"{requirement} is not met: {name} {installed} is installed")
    if problems:
        raise InvalidPackageError(
            f"model {manifest.name} cannot be served by {sys.executable}: "
            + "; ".join(problems)
            + ". Install the requirements listed in its manifest.yaml (pip install ...)"
        )


def _satisfies(requirement: str, installed: str) -> bool:
    """Whether ``installed`` meets ``requirement``'s specifier (True when it cannot tell)."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.version import InvalidVersion
    except ImportError:
        return True
    try:
        return Requirement(requirement).specifier.contains(installed, prereleases=True)
    except (InvalidRequirement, InvalidVersion):
        return True


def load_model(package_dir: Path) -> LoadedModel:
    """Validate the package, check its requirements, import its entry module and call ``init()``.

    The module is imported under a name unique to the package directory, so several
    packages (all with a ``score`` module) can be loaded in one process, as tests do.

    Raises:
        InvalidPackageError: bad manifest, missing requirement, or no ``score`` function.
        ScoringError: the module's import or ``init()`` raised.
    """
    package_dir = package_dir.resolve()
    manifest = load_manifest(package_dir)
    check_requirements(manifest)
    module = _import_entry(manifest, package_dir)
    score = getattr(module, "score", None)
    if not callable(score):
        raise InvalidPackageError(
            f"model {manifest.name}: entry module {manifest.entry_module!r} has no score(record) function"
        )
    init = getattr(module, "init", None)
    if callable(init):
        try:
            init()
        except Exception as exc:
            raise ScoringError(
                f"model {manifest.name}: init() in {manifest.entry_module!r} raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    own_batch = getattr(module, "score_batch", None)
    metrics = getattr(module, "metrics", None)
    score_columns = getattr(module, "score_columns", None)
    return LoadedModel(
        manifest=manifest,
        package_dir=package_dir,
        score=score,
        score_batch=own_batch if callable(own_batch) else _looped(score),
        vectorised=callable(own_batch),
        metrics=metrics if callable(metrics) else None,
        score_columns=score_columns if callable(score_columns) else None,
    )


def _import_entry(manifest: ModelManifest, package_dir: Path) -> ModuleType:
    """Import the entry module from its file, with the package dir importable for helpers."""
    path = package_dir / f"{manifest.entry_module.replace('.', '/')}.py"
    digest = hashlib.sha256(str(package_dir).encode()).hexdigest()[:12]
    unique = f"_mlc_model_{digest}_{manifest.entry_module.replace('.', '_')}"
    if str(package_dir) not in sys.path:
        sys.path.insert(0, str(package_dir))
    spec = importlib.util.spec_from_file_location(unique, path)
    if spec is None or spec.loader is None:
        raise InvalidPackageError(f"model {manifest.name}: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[unique]
        raise ScoringError(
            f"model {manifest.name}: importing {path.name} raised {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _looped(score: ScoreFn) -> ScoreBatchFn:
    """A batch function for modules that only score one record at a time."""

    def score_batch(records: Sequence[Record]) -> list[Record]:
        return [score(r) for r in records]

    return score_batch

"""Stage-test logic with no network or process I/O: datasets, comparisons, metrics.

Both ways of running a model (an online endpoint and a batch job) end in the same
outputs-per-record lists, so the checks live here once and the activity only fetches
outputs. Only the standard library is used, so workers need no numpy to judge models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlc.domain import TestKind, TestResult
from mlc.errors import InvalidPackageError
from mlc.manifest import ModelManifest, SampleCase

Record = dict[str, Any]


@dataclass(frozen=True)
class EvaluationSet:
    """A package's labelled evaluation data, split into model inputs and labels."""

    records: list[Record]
    """Records with the label field removed, ready to score."""
    labels: list[int]


def load_evaluation(manifest: ModelManifest, package_dir: Path) -> EvaluationSet:
    """Read the manifest's evaluation file (an empty set when it declares none).

    Raises:
        InvalidPackageError: a line is not a JSON object or lacks a 0/1 label; names file:line.
    """
    if manifest.evaluation is None:
        return EvaluationSet(records=[], labels=[])
    label = manifest.evaluation.label
    path = package_dir / manifest.evaluation.path
    records: list[Record] = []
    labels: list[int] = []
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidPackageError(f"{path}:{number}: not valid JSON: {exc}") from exc
            value = record.pop(label, None) if isinstance(record, dict) else None
            if value not in (0, 1):
                raise InvalidPackageError(
                    f"{path}:{number}: expected an object with label {label!r} of 0 or 1"
                )
            records.append(record)
            labels.append(int(value))
    return EvaluationSet(records=records, labels=labels)


def test_dataset(manifest: ModelManifest, package_dir: Path) -> list[Record]:
    """Inputs a batch job scores for stage tests: every sample, then the evaluation records.

    Output line *i* of the job then belongs to sample *i* for ``i < len(samples)`` and to
    evaluation record ``i - len(samples)`` after that.
    """
    samples = [dict(s.input) for s in manifest.samples]
    return samples + load_evaluation(manifest, package_dir).records


test_dataset.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def check_samples(manifest: ModelManifest, outputs: Sequence[Any], *, deployment_id: str) -> TestResult:
    """The smoke test: does each sample's output match its expected fields?

    Only fields named in ``expected`` are compared; numbers within the sample's
    tolerance, everything else exactly. ``outputs`` holds one entry per sample, in order;
    an entry that is not a dict (an HTTP error text, say) fails that sample.
    """
    failures: list[str] = []
    if len(outputs) != len(manifest.samples):
        failures.append(f"got {len(outputs)} outputs for {len(manifest.samples)} samples")
    for index, (case, output) in enumerate(zip(manifest.samples, outputs, strict=False)):
        problem = _sample_problem(case, output)
        if problem:
            failures.append(f"sample {index + 1}: {problem}")
    total = len(manifest.samples)
    matched = total - sum(1 for f in failures if f.startswith("sample "))
    if not failures:
        summary = f"{total}/{total} samples match" if total else "no samples declared"
    else:
        summary = f"{matched}/{total} samples match; " + "; ".join(failures[:5])
        if len(failures) > 5:
            summary += f"; and {len(failures) - 5} more"
    return TestResult(
        test=TestKind.SMOKE,
        deployment_id=deployment_id,
        passed=not failures,
        summary=summary,
        metrics={"samples": float(total), "matched": float(matched)},
    )


def _sample_problem(case: SampleCase, output: Any) -> str | None:
    if not isinstance(output, dict):
        return f"no output ({_short(output)})"
    for field, expected in case.expected.items():
        if field not in output:
            return f"output has no field {field!r}"
        actual = output[field]
        if _is_number(expected) and _is_number(actual):
            if abs(float(actual) - float(expected)) > case.tolerance:
                margin = f" ± {case.tolerance:g}" if isinstance(expected, float) else ""
                return f"{field} = {actual}, expected {expected}{margin}"
        elif actual != expected:
            return f"{field} = {_short(actual)}, expected {_short(expected)}"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compute_metrics(
    labels: Sequence[int], scores: Sequence[float], predictions: Sequence[int] | None = None
) -> dict[str, float]:
    """Classification metrics of ``scores`` (and 0/1 ``predictions``) against 0/1 ``labels``.

    ``auc`` is the Mann-Whitney rank statistic with average ranks for ties (what
    ``sklearn.metrics.roc_auc_score`` computes); it is left out when only one class is
    present, because it is undefined. ``accuracy``, ``precision``, ``recall`` and ``f1``
    need ``predictions``; precision and recall are 0 when their denominator is.

    Raises:
        ValueError: the sequences differ in length.
    """
    n = len(labels)
    if len(scores) != n or (predictions is not None and len(predictions) != n):
        raise ValueError(
            f"got {n} labels, {len(scores)} scores and "
            f"{'no' if predictions is None else len(predictions)} predictions"
        )
    positives = sum(1 for y in labels if y == 1)
    result: dict[str, float] = {
        "records": float(n),
        "positive_rate": positives / n if n else 0.0,
    }
    if 0 < positives < n:
        result["auc"] = _auc(labels, scores, positives)
    if predictions is not None:
        tp = sum(1 for y, p in zip(labels, predictions, strict=True) if y == 1 and p == 1)
        fp = sum(1 for y, p in zip(labels, predictions, strict=True) if y != 1 and p == 1)
        correct = sum(1 for y, p in zip(labels, predictions, strict=True) if (y == 1) == (p == 1))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / positives if positives else 0.0
        result["accuracy"] = correct / n if n else 0.0
        result["precision"] = precision
        result["recall"] = recall
        result["f1"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return result


def _auc(labels: Sequence[int], scores: Sequence[float], positives: int) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    order = sorted(range(len(scores)), key=scores.__getitem__)
    rank_sum = 0.0
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        average_rank = (start + end) / 2 + 1
        rank_sum += average_rank * sum(1 for i in order[start : end + 1] if labels[i] == 1)
        start = end + 1
    negatives = len(labels) - positives
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def check_thresholds(
    metrics: Mapping[str, float], thresholds: Mapping[str, float], *, deployment_id: str
) -> TestResult:
    """The metrics test: is every thresholded metric at least its minimum?

    A metric that could not be computed (``auc`` on one class, ``recall`` without a
    prediction field) fails, naming why, rather than passing silently.
    """
    verdicts: list[str] = []
    failed: list[str] = []
    for name, minimum in thresholds.items():
        value = metrics.get(name)
        if value is None or math.isnan(value):
            failed.append(f"{name} not computed (needs both classes and, for decisions, a prediction field)")
        elif value < minimum:
            failed.append(f"{name} {value:.3f} < {minimum:.3f}")
        else:
            verdicts.append(f"{name} {value:.3f} >= {minimum:.3f}")
    if failed:
        summary = "; ".join(failed)
    elif verdicts:
        summary = ", ".join(verdicts)
    else:
        summary = "no thresholds declared; " + ", ".join(
            f"{k} {v:.3f}" for k, v in metrics.items() if k not in ("records", "positive_rate")
        )
    return TestResult(
        test=TestKind.METRICS,
        deployment_id=deployment_id,
        passed=not failed,
        summary=summary,
        metrics=dict(metrics),
    )


def evaluate_outputs(
    manifest: ModelManifest, labels: Sequence[int], outputs: Sequence[Any], *, deployment_id: str
) -> TestResult:
    """Turn a model's outputs for the evaluation records into the metrics test result.

    Outputs that lack the score field (or are not objects) fail the test with a summary
    naming the first bad record, since a model that answers malformed cannot be judged.
    """
    if manifest.evaluation is None:
        return TestResult(
            test=TestKind.METRICS,
            deployment_id=deployment_id,
            passed=not manifest.thresholds,
            summary="no evaluation data declared in the manifest"
            + ("; thresholds cannot be checked" if manifest.thresholds else ""),
        )
    spec = manifest.evaluation
    if len(outputs) != len(labels):
        return _metrics_failure(
            deployment_id, f"got {len(outputs)} outputs for {len(labels)} evaluation records"
        )
    scores: list[float] = []
    predictions: list[int] | None = [] if spec.prediction_field else None
    for index, output in enumerate(outputs):
        score: Any = output.get(spec.score_field) if isinstance(output, dict) else None
        if not _is_number(score):
            return _metrics_failure(
                deployment_id,
                f"evaluation record {index}: output {_short(output)} has no numeric {spec.score_field!r}",
            )
        scores.append(float(score))
        if predictions is not None:
            predictions.append(1 if output.get(spec.prediction_field) in (1, True) else 0)
    return check_thresholds(
        compute_metrics(labels, scores, predictions),
        manifest.thresholds,
        deployment_id=deployment_id,
    )


def _metrics_failure(deployment_id: str, summary: str) -> TestResult:
    return TestResult(test=TestKind.METRICS, deployment_id=deployment_id, passed=False, summary=summary)


def compare_champion(
    manifest: ModelManifest,
    labels: Sequence[int],
    challenger_outputs: Sequence[Any],
    champion_outputs: Sequence[Any] | None,
    *,
    max_auc_drop: float,
    deployment_id: str,
    champion: str | None = None,
) -> TestResult:
    """The champion/challenger test: is the challenger's AUC at most ``max_auc_drop`` worse?

    Both answered the same labelled records. ``champion_outputs`` None means there is no
    champion to compare with: the test passes and says so. ``champion`` names it in the
    summary (``cc-fraud@1 (deployment ...)``).
    """
    kind = TestKind.CHAMPION_CHALLENGER
    mine = evaluate_outputs(manifest, labels, challenger_outputs, deployment_id=deployment_id)
    challenger_auc = mine.metrics.get("auc")
    if challenger_auc is None:
        why = mine.summary if not mine.metrics else "AUC not computed (the data needs both classes)"
        return TestResult(test=kind, deployment_id=deployment_id, passed=False, summary=f"challenger: {why}")
    if champion_outputs is None:
        return TestResult(
            test=kind,
            deployment_id=deployment_id,
            passed=True,
            summary=f"no champion: nothing serves this stage yet; challenger AUC {challenger_auc:.3f}",
            metrics={"challenger_auc": challenger_auc},
        )
    theirs = evaluate_outputs(manifest, labels, champion_outputs, deployment_id=deployment_id)
    champion_auc = theirs.metrics.get("auc")
    if champion_auc is None:
        return TestResult(
            test=kind,
            deployment_id=deployment_id,
            passed=False,
            summary=f"champion {champion or ''} could not be judged on this data: {theirs.summary}",
            metrics={"challenger_auc": challenger_auc},
        )
    drop = champion_auc - challenger_auc
    passed = drop <= max_auc_drop + 1e-12
    verdict = "not worse than" if passed else "worse than"
    return TestResult(
        test=kind,
        deployment_id=deployment_id,
        passed=passed,
        summary=(
            f"challenger AUC {challenger_auc:.3f} vs champion {champion or ''} AUC {champion_auc:.3f}: "
            f"{verdict} the champion by more than {max_auc_drop:.3f} "
            f"({len(labels)} labelled records)"
        ).replace("champion  AUC", "champion AUC"),
        metrics={
            "challenger_auc": challenger_auc,
            "champion_auc": champion_auc,
            "auc_drop": drop,
            "max_auc_drop": max_auc_drop,
            "records": float(len(labels)),
        },
    )

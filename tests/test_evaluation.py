"""Stage-test logic: metrics against scikit-learn, thresholds, sample checks, datasets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from mlc import evaluation
from mlc.domain import TestKind
from mlc.errors import InvalidPackageError
from mlc.manifest import SampleCase, load_manifest

WEAK_MODEL = Path(__file__).parent / "fixtures" / "models" / "weak-model"


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn(seed: int) -> None:
    rng = random.Random(seed)
    labels = [int(rng.random() < 0.1) for _ in range(500)]
    # Rounded scores give many ties, which the rank statistic must average.
    scores = [round(rng.random() * 0.5 + 0.4 * y, 2) for y in labels]
    predictions = [int(s >= 0.5) for s in scores]
    metrics = evaluation.compute_metrics(labels, scores, predictions)
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert metrics["precision"] == pytest.approx(precision_score(labels, predictions))
    assert metrics["recall"] == pytest.approx(recall_score(labels, predictions))
    assert metrics["f1"] == pytest.approx(f1_score(labels, predictions))
    assert metrics["records"] == 500
    assert metrics["positive_rate"] == pytest.approx(sum(labels) / 500)


def test_auc_edge_cases() -> None:
    assert evaluation.compute_metrics([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8])["auc"] == 1.0
    assert evaluation.compute_metrics([0, 1, 0, 1], [0.9, 0.1, 0.8, 0.2])["auc"] == 0.0
    assert evaluation.compute_metrics([0, 1, 0, 1], [0.5] * 4)["auc"] == 0.5
    one_class = evaluation.compute_metrics([0, 0, 0], [0.1, 0.2, 0.3], [0, 0, 1])
    assert "auc" not in one_class
    assert one_class["precision"] == 0.0 and one_class["recall"] == 0.0
    with pytest.raises(ValueError, match="3 labels, 2 scores"):
        evaluation.compute_metrics([0, 1, 0], [0.1, 0.2])


def test_thresholds_pass_and_fail_with_readable_summaries() -> None:
    metrics = {"auc": 0.62, "recall": 0.71}
    failed = evaluation.check_thresholds(metrics, {"auc": 0.8, "recall": 0.5}, deployment_id="d1")
    assert failed.test is TestKind.METRICS
    assert not failed.passed
    assert failed.summary == "auc 0.620 < 0.800"
    assert failed.metrics == metrics
    passed = evaluation.check_thresholds(metrics, {"auc": 0.6, "recall": 0.7}, deployment_id="d1")
    assert passed.passed
    assert passed.summary == "auc 0.620 >= 0.600, recall 0.710 >= 0.700"
    missing = evaluation.check_thresholds({"auc": 0.9}, {"f1": 0.1}, deployment_id="d1")
    assert not missing.passed
    assert missing.summary.startswith("f1 not computed")


def test_check_samples() -> None:
    manifest = load_manifest(WEAK_MODEL).model_copy(
        update={
            "samples": (
                SampleCase(input={}, expected={"is_fraud": 0}),
                SampleCase(input={}, expected={"probability": 0.3}, tolerance=0.01),
            )
        }
    )
    ok = evaluation.check_samples(
        manifest, [{"is_fraud": 0, "probability": 0.1}, {"probability": 0.305}], deployment_id="d"
    )
    assert ok.passed, ok.summary
    assert ok.summary == "2/2 samples match"
    bad = evaluation.check_samples(manifest, [{"is_fraud": 1}, {"probability": 0.32}], deployment_id="d")
    assert not bad.passed
    assert bad.summary == (
        "0/2 samples match; sample 1: is_fraud = 1, expected 0; "
        "sample 2: probability = 0.32, expected 0.3 ± 0.01"
    )
    errors = evaluation.check_samples(manifest, ["HTTP 500: boom", {}], deployment_id="d")
    assert "sample 1: no output ('HTTP 500: boom')" in errors.summary
    assert "sample 2: output has no field 'probability'" in errors.summary
    short = evaluation.check_samples(manifest, [{"is_fraud": 0}], deployment_id="d")
    assert not short.passed and "got 1 outputs for 2 samples" in short.summary


def test_dataset_is_samples_then_unlabelled_eval_records() -> None:
    manifest = load_manifest(WEAK_MODEL)
    dataset = evaluation.test_dataset(manifest, WEAK_MODEL)
    rows = (WEAK_MODEL / "data" / "eval.jsonl").read_text().splitlines()
    assert len(dataset) == len(manifest.samples) + len(rows)
    assert dataset[0] == manifest.samples[0].input
    first = json.loads(rows[0])
    del first["is_fraud"]
    assert dataset[len(manifest.samples)] == first
    assert all("is_fraud" not in r for r in dataset)


def test_weak_model_outputs_fail_the_auc_threshold() -> None:
    manifest = load_manifest(WEAK_MODEL)
    labels = evaluation.load_evaluation(manifest, WEAK_MODEL).labels
    outputs = [{"probability": 0.04, "is_fraud": 0}] * len(labels)
    result = evaluation.evaluate_outputs(manifest, labels, outputs, deployment_id="d")
    assert not result.passed
    assert result.summary == "auc 0.500 < 0.800"
    malformed = evaluation.evaluate_outputs(manifest, labels, [{}] * len(labels), deployment_id="d")
    assert not malformed.passed
    assert "no numeric 'probability'" in malformed.summary


def test_bad_label_names_file_and_line(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "data").mkdir(parents=True)
    (package / "manifest.yaml").write_text((WEAK_MODEL / "manifest.yaml").read_text())
    (package / "score.py").write_text("")
    (package / "data" / "eval.jsonl").write_text('{"amount": 1, "is_fraud": 0}\n{"amount": 2}\n')
    with pytest.raises(InvalidPackageError, match=r"eval\.jsonl:2: .*label 'is_fraud'"):
        evaluation.load_evaluation(load_manifest(package), package)

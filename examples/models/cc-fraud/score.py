"""Scoring module of the cc-fraud model: the contract the model server calls.

``init()`` loads the trained pipeline once per process; ``score`` handles one record and
``score_batch`` many at once, vectorised, because per-record numpy calls dominate the
cost of large batches. ``features`` is shared with ``train.py`` so training and serving
can never disagree on the feature order or transforms.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.metrics import roc_auc_score

MODEL_FILE = Path(__file__).resolve().parent / "model.joblib"
FEATURES = (
    "amount",
    "hour",
    "merchant_risk",
    "distance_from_home",
    "foreign",
    "card_present",
    "velocity_24h",
)
LABEL = "is_fraud"

_model: Any = None
_threshold = 0.5


_RAW = itemgetter(*FEATURES)
"""A record's raw fields in feature order (booleans become 1.0/0.0 as floats)."""


def features(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """Turn records into the model's feature matrix (log amounts, a night flag, 0/1 flags).

    The raw fields go into one float matrix in a C loop (``fromiter``), then the transforms
    run per column in numpy: per record, only one ``itemgetter`` call runs in Python.
    """
    n = len(records)
    matrix = np.fromiter(chain.from_iterable(map(_RAW, records)), dtype=np.float64, count=n * 7)
    matrix = matrix.reshape(n, 7)
    np.log1p(matrix[:, 0], out=matrix[:, 0])
    np.less(matrix[:, 1], 6, out=matrix[:, 1])
    np.log1p(matrix[:, 3], out=matrix[:, 3])
    return matrix


def init() -> None:
    """Load the trained pipeline and its decision threshold (written by ``train.py``)."""
    global _model, _threshold
    bundle = joblib.load(MODEL_FILE)
    _model = bundle["pipeline"]
    _threshold = float(bundle["threshold"])


def score(record: dict[str, Any]) -> dict[str, Any]:
    """Score one transaction."""
    return score_batch([record])[0]


def score_batch(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Score many transactions with one ``predict_proba`` call."""
    if not records:
        return []
    probabilities = _model.predict_proba(features(records))[:, 1]
    decisions = (probabilities >= _threshold).astype(np.int64).tolist()
    return [{"probability": p, "is_fraud": d} for p, d in zip(probabilities.tolist(), decisions, strict=True)]


def score_columns(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Score whole columns at once (batch jobs): the same features as ``features``, in numpy."""
    matrix = np.column_stack(
        [
            np.log1p(columns["amount"]),
            (columns["hour"] < 6).astype(np.float64),
            columns["merchant_risk"],
            np.log1p(columns["distance_from_home"]),
            columns["foreign"].astype(np.float64),
            columns["card_present"].astype(np.float64),
            columns["velocity_24h"].astype(np.float64),
        ]
    )
    probabilities = _model.predict_proba(matrix)[:, 1]
    return {"probability": probabilities, "is_fraud": (probabilities >= _threshold).astype(np.int64)}


def metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    """AUC, precision and recall over labelled records (the model's own view of itself)."""
    labels = [int(r[LABEL]) for r in records]
    outputs = score_batch([{k: r[k] for k in FEATURES} for r in records])
    predicted = [o["is_fraud"] for o in outputs]
    hits = sum(1 for y, p in zip(labels, predicted, strict=True) if y == 1 and p == 1)
    result = {
        "records": float(len(records)),
        "precision": hits / max(1, sum(predicted)),
        "recall": hits / max(1, sum(labels)),
    }
    if 0 < sum(labels) < len(labels):
        result["auc"] = float(roc_auc_score(labels, [o["probability"] for o in outputs]))
    return result

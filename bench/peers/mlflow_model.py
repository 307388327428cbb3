"""The cc-fraud package as an MLflow pyfunc model ("models from code"), for ``bench/bench_scoring.py``.

Runs in mlflow's own venv (``bench/peers/mlflow.lock``), never imported by the project.
A user deploying the package with ``mlflow models serve`` for speed writes this: the request
carries the raw transaction fields as one float matrix (``{"inputs": [[...], ...]}``, a row
per record, the input schema's fields in the order the model config's ``columns`` gives,
booleans as 0/1: mlflow's cheapest input), mlflow checks it against the model's tensor
signature (the counterpart of our input-schema validation) and hands the array to
``predict``, which runs the package's own ``score.py`` (``score_columns``: the same features
as ``features()``, vectorised over columns) and the pipeline's ``predict_proba``. The
answer is the probability and the 0/1 decision, as ours returns.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd


class CcFraudModel(mlflow.pyfunc.PythonModel):
    """A raw-field matrix in, ``probability`` and ``is_fraud`` columns out."""

    def load_context(self, context: Any) -> None:
        """Import the packaged ``score.py`` (an artifact) and run its ``init()``."""
        package = Path(context.artifacts["package"])
        spec = importlib.util.spec_from_file_location("cc_fraud_score", package / "score.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.init()
        self._score = module
        self._columns = list(context.model_config["columns"])

    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> pd.DataFrame:
        """Score every row with one ``predict_proba`` call."""
        out = self._score.score_columns({name: model_input[:, i] for i, name in enumerate(self._columns)})
        return pd.DataFrame(out)


mlflow.models.set_model(CcFraudModel())

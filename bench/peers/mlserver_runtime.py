"""The cc-fraud package as an MLServer custom runtime, for ``bench/bench_scoring.py``.

Runs in MLServer's own venv (``bench/peers/mlserver.lock``), never imported by the project.
A user deploying the package on MLServer for speed writes this: the request carries the raw
transaction fields as one V2 FP64 tensor (a row per record, the input schema's fields in
the order ``parameters.extra.columns`` gives, booleans as 0/1: MLServer's cheapest input,
decoded by ``NumpyCodec``), and the package's own ``score.py`` (``score_columns``: the same
features as ``features()``, vectorised over columns) computes the features and calls the
pipeline's ``predict_proba``. The answer is the probability and the 0/1 decision, as ours
returns.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


def load_score_module(package: Path) -> Any:
    """Import the package's ``score.py`` and run its ``init()`` (loads the pipeline)."""
    spec = importlib.util.spec_from_file_location("cc_fraud_score", package / "score.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.init()
    return module


class CcFraudRuntime(MLModel):
    """A raw-field FP64 tensor in, ``probability`` and ``is_fraud`` tensors out."""

    async def load(self) -> bool:
        """``parameters.uri`` is the unpacked model package."""
        uri = self.settings.parameters.uri if self.settings.parameters else None
        assert uri, "model-settings.json must give parameters.uri (the package folder)"
        extra = self.settings.parameters.extra if self.settings.parameters else None
        self._columns = list((extra or {})["columns"])
        self._score = load_score_module(Path(uri))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Score every row of the request's columns with one ``predict_proba`` call."""
        matrix = NumpyCodec.decode_input(payload.inputs[0])
        out = self._score.score_columns({name: matrix[:, i] for i, name in enumerate(self._columns)})
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                NumpyCodec.encode_output("probability", out["probability"]),
                NumpyCodec.encode_output("is_fraud", out["is_fraud"]),
            ],
        )

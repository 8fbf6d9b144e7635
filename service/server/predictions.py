"""What the model answers, watched for drift: each answered image's top-1 class and its
score, per model version, as Prometheus series (``classifier_predictions_total`` and the
``classifier_top1_score`` histogram). A shift in the class mix or a fall in confidence is
the first sign that what the model is shown has changed (deploy/prometheus has the alert).

Labels stay bounded whatever the model: the first ``prediction_classes_max`` classes of
its ModelSpec are counted by name, any later class as ``other``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.model.spec import ModelSpec
from service.server.metrics import Metrics

OTHER = "other"


class PredictionWatch:
    def __init__(self, metrics: Metrics, max_classes: int, enabled: bool = True):
        self.metrics = metrics
        self.max_classes = max_classes
        self.enabled = enabled  # off: --no-prediction-watch

    def class_label(self, spec: ModelSpec, index: int) -> str:
        if index >= self.max_classes:
            return OTHER
        return spec.labels[index] if index < len(spec.labels) else str(index)

    def record(
        self, model: str, version: str, spec: ModelSpec, rows: Sequence[dict[str, np.ndarray]]
    ) -> None:
        """Count the top-1 class and score of each row (one answered image each)."""
        if not rows or not self.enabled:
            return
        probabilities = np.stack([row[spec.outputs.probabilities] for row in rows])
        probabilities = probabilities.reshape(len(rows), -1)
        top = probabilities.argmax(axis=1)
        scores = probabilities[np.arange(len(rows)), top]
        m = self.metrics
        histogram = m.child(m.top1_score, model, version)
        for index, score in zip(top.tolist(), scores.tolist(), strict=True):
            m.child(m.predictions, model, version, self.class_label(spec, index)).inc()
            histogram.observe(score)

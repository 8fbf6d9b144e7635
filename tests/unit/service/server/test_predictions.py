"""The prediction watch: every answered image's top-1 class and score reach /metrics,
with the class labels bounded by ``prediction_classes_max``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from service.server.calls import CallInfo
from service.server.domain import ImageRequest
from service.server.metrics import Metrics
from service.server.predictions import OTHER, PredictionWatch
from tests.unit.service.model.gpu_decode_models import spec_for
from tests.unit.service.server.planes import MODEL, build_plane, jpeg, publish


def samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == name
    }


def test_top1_classes_and_scores_are_counted_with_bounded_labels() -> None:
    spec = spec_for()
    metrics = Metrics()
    watch = PredictionWatch(metrics, max_classes=2)
    rows = []
    for top, score in ((0, 0.9), (1, 0.6), (3, 0.97), (3, 0.5)):
        probabilities = np.full(spec.num_classes, (1 - score) / (spec.num_classes - 1), np.float32)
        probabilities[top] = score
        rows.append({spec.outputs.probabilities: probabilities})
    watch.record("m", "1", spec, rows)
    counts = {
        dict(k)["class"]: v for k, v in samples(metrics, "classifier_predictions_total").items()
    }
    assert counts == {spec.labels[0]: 1, spec.labels[1]: 1, OTHER: 2}
    scores = samples(metrics, "classifier_top1_score_sum")
    assert abs(sum(scores.values()) - (0.9 + 0.6 + 0.97 + 0.5)) < 1e-5
    buckets = samples(metrics, "classifier_top1_score_bucket")
    assert buckets[(("le", "0.5"), ("model", "m"), ("version", "1"))] == 1


def test_answered_images_reach_the_watch_from_the_data_plane(tmp_path: Path) -> None:
    publish(tmp_path, 1)

    async def main() -> None:
        p = await build_plane(tmp_path)
        try:
            images = [jpeg((200, 10, 10)), jpeg((10, 200, 10)), jpeg((10, 10, 200))]
            await p.plane.classify(CallInfo(""), ImageRequest(MODEL, "", images))
            counts = samples(p.metrics, "classifier_predictions_total")
            assert sum(counts.values()) == 3
            assert {dict(k)["version"] for k in counts} == {"1"}
            count = samples(p.metrics, "classifier_top1_score_count")
            assert list(count.values()) == [3]
        finally:
            await p.close()

    asyncio.run(main())

"""Metrics: series of unloaded versions and models are removed; failures start at 0."""

from __future__ import annotations

from service.server.metrics import UNKNOWN_MODEL, Metrics


def labelled(metrics: Metrics) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in metrics.registry.collect()
        for s in family.samples
        if "model" in s.labels
    }


def test_forgetting_a_version_removes_its_series_and_keeps_the_others() -> None:
    m = Metrics()
    for version in ("1", "2"):
        m.child(m.requests, "demo", version, "Classify", "OK").inc()
        m.child(m.images, "demo", version).inc(3)
        m.child(m.model_ready, "demo", version).set(1)
        m.child(m.dropped_images, "demo", version, "deadline").inc()
    m.child(m.request_duration, "demo", "Classify").observe(0.01)
    m.model_known("demo")
    m.forget_version("demo", "1")
    versions = {dict(labels).get("version") for _, labels in labelled(m)}
    assert "1" not in versions and "2" in versions
    assert any(name.startswith("classifier_request_duration") for name, _ in labelled(m))
    m.forget_model("demo")
    assert labelled(m) == set()


def test_load_failures_exist_at_zero_once_a_model_is_known() -> None:
    m = Metrics()
    m.model_known("demo")
    samples = {
        (s.name, s.labels.get("model")): s.value
        for family in m.registry.collect()
        for s in family.samples
    }
    assert samples[("classifier_model_load_failures_total", "demo")] == 0


def test_child_is_cached_and_the_unknown_label_is_one_value() -> None:
    m = Metrics()
    a = m.child(m.requests, UNKNOWN_MODEL, "", "Classify", "NOT_FOUND")
    assert a is m.child(m.requests, UNKNOWN_MODEL, "", "Classify", "NOT_FOUND")
    before = m.series_count()
    for _ in range(100):
        m.child(m.requests, UNKNOWN_MODEL, "", "Classify", "NOT_FOUND").inc()
    assert m.series_count() == before

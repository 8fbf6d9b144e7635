"""The statistics extension on a real in-process data plane: calls run through the call
envelope, as both front doors run them, and the statistics read back from the Prometheus
counters say how many succeeded and failed, how many images and batches ran, and where the
time went."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service.model.errors import NotFoundError
from service.server.calls import CallInfo
from service.server.domain import ImageRequest
from service.server.statistics import BATCH_STATS, REQUEST_STATS
from tests.unit.service.server.planes import (
    MODEL,
    Plane,
    jpeg,
    run_scenario,
)


async def classify(p: Plane, images: list[bytes], version: str = "2") -> bool:
    async def handler(call: CallInfo) -> object:
        return await p.plane.classify(call, ImageRequest(MODEL, version, images))

    outcome = await p.envelope.run("Classify", handler, given_id=None, peer="test", model=MODEL)
    return outcome.ok


def test_counts_and_durations_of_answered_and_failed_requests(two_versions: Path) -> None:
    async def scenario(p: Plane) -> None:
        started_ms = time.time() * 1000
        for _ in range(3):
            assert await classify(p, [jpeg((200, 30, 30)), jpeg((20, 30, 200))])
        assert not await classify(p, [jpeg((1, 2, 3)), b"not an image"])  # fails whole
        (stats,) = p.plane.statistics(CallInfo(""), MODEL, "2")
        assert (stats.name, stats.version) == (MODEL, "2")
        infer = stats.inference_stats
        assert set(infer) == set(REQUEST_STATS)
        assert (infer["success"].count, infer["fail"].count) == (3, 1)
        assert all(infer[s].count == 3 for s in ("queue", "compute_input", "compute_infer"))
        assert infer["compute_output"].count == 3
        assert infer["success"].ns > 0 and infer["fail"].ns > 0
        stages = sum(
            infer[s].ns for s in ("queue", "compute_input", "compute_infer", "compute_output")
        )
        # The stages follow each other inside the call: they add up to a little less.
        assert 0 < stages <= infer["success"].ns
        assert stats.inference_count == 6  # images answered; the failed call's are not
        assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == 6
        assert stats.execution_count == sum(b.compute_infer.count for b in stats.batch_stats)
        for batch in stats.batch_stats:
            assert all(getattr(batch, s).ns > 0 for s in BATCH_STATS[1:])
        assert started_ms - 1 <= stats.last_inference <= time.time() * 1000 + 1

    run_scenario(two_versions, scenario)


def test_which_versions_a_statistics_call_covers(two_versions: Path) -> None:
    async def scenario(p: Plane) -> None:
        assert await classify(p, [jpeg((9, 9, 9))], version="1")
        every = p.plane.statistics(CallInfo(""), "", "")
        assert [(s.name, s.version) for s in every] == [(MODEL, "1"), (MODEL, "2")]
        assert [s.inference_count for s in every] == [1, 0]  # zeros: nothing answered yet
        assert [s.last_inference for s in every][1] == 0
        assert len(p.plane.statistics(CallInfo(""), MODEL, "")) == 2
        with pytest.raises(NotFoundError):
            p.plane.statistics(CallInfo(""), "nope", "")
        with pytest.raises(NotFoundError):
            p.plane.statistics(CallInfo(""), MODEL, "7")

    run_scenario(two_versions, scenario, version_policy="all")


def test_statistics_and_metrics_are_the_same_counters(two_versions: Path) -> None:
    async def scenario(p: Plane) -> None:
        for _ in range(2):
            assert await classify(p, [jpeg((50, 60, 70))])
        (stats,) = p.plane.statistics(CallInfo(""), MODEL, "2")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in p.metrics.registry.collect()
            for s in family.samples
        }
        key = (("model", MODEL), ("stat", "success"), ("version", "2"))
        assert (
            samples[("classifier_request_stats_total", key)]
            == stats.inference_stats["success"].count
        )
        images = (("model", MODEL), ("version", "2"))
        assert samples[("classifier_images_total", images)] == stats.inference_count

    run_scenario(two_versions, scenario)
